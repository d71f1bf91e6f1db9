//! The operator's CLI through the real binary against a real server: login,
//! catalog, grants, every output format round-tripped, exit codes, and the
//! interactive shell through a pseudo-terminal.

use std::fs::File;
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;

use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::datatypes::SchemaRef;
use veil_engine::meta;

use crate::support::*;

/// The `veil` binary with its configuration and history in `home`, and no
/// connection settings from the environment.
fn veil(home: &Path) -> assert_cmd::Command {
    let mut c = assert_cmd::Command::new(env!("CARGO_BIN_EXE_veil"));
    c.env("VEIL_CONFIG", home.join("config.toml"))
        .env("XDG_STATE_HOME", home.join("state"))
        .env_remove("VEIL_ENDPOINT")
        .env_remove("VEIL_TOKEN")
        .env_remove("VEIL_LOG");
    c
}

fn text(out: &[u8]) -> String {
    String::from_utf8_lossy(out).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_stores_a_session_and_catalog_grants_and_budget_use_it() {
    let f = Fixture::start().await;
    let home = tempfile::tempdir().expect("tmp");
    let out = veil(home.path())
        .args([
            "login",
            "--endpoint",
            &f.server.endpoint(),
            "--operator",
            "op-univ-07",
        ])
        .write_stdin("demo-token-op-univ-07\n")
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let config = home.path().join("config.toml");
    let mode = std::fs::metadata(&config)
        .expect("config")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "only the owner may read the token");
    let stored = std::fs::read_to_string(&config).expect("config");
    assert!(
        !stored.contains("demo-token-op-univ-07"),
        "the operator token itself is never stored: {stored}"
    );
    assert!(stored.contains("expires"), "{stored}");

    let out = veil(home.path()).arg("catalog").output().expect("run");
    let catalog = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(catalog.contains("pop.residents"), "{catalog}");
    assert!(catalog.contains("wjw.outpatient_visits"), "{catalog}");
    assert!(!catalog.contains("hrss."), "not granted: {catalog}");
    assert!(catalog.contains("16 public keys"), "{catalog}");

    let out = veil(home.path()).arg("grants").output().expect("run");
    let grants = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(grants.contains("grant G-2026-031  opening"), "{grants}");
    assert!(grants.contains("budget 10 epsilon total"), "{grants}");

    let out = veil(home.path()).arg("budget").output().expect("run");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("grant G-2026-031"));

    // The stored session goes only to the server it was made for.
    let out = veil(home.path())
        .args(["catalog", "--endpoint", "http://127.0.0.1:9"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("not logged in"),
        "{}",
        text(&out.stderr)
    );
    // Server refusals keep their exit codes in every command.
    let out = veil(home.path())
        .args([
            "grants",
            "--endpoint",
            &f.server.endpoint(),
            "--token",
            "wrong",
        ])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(4), "{}", text(&out.stderr));

    // A wrong token is refused at login, with its own exit code.
    let out = veil(home.path())
        .args([
            "login",
            "--endpoint",
            &f.server.endpoint(),
            "--operator",
            "op-univ-07",
            "--token",
            "wrong",
        ])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(4), "{}", text(&out.stderr));
}

fn reread_parquet(path: &Path) -> (SchemaRef, Vec<RecordBatch>) {
    use datafusion::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    let builder =
        ParquetRecordBatchReaderBuilder::try_new(File::open(path).expect("open")).expect("parquet");
    let schema = builder.schema().clone();
    let reader = builder.build().expect("reader");
    let batches = reader.collect::<Result<Vec<_>, _>>().expect("batches");
    (schema, batches)
}

fn reread_arrow(path: &Path) -> (SchemaRef, Vec<RecordBatch>) {
    let reader =
        datafusion::arrow::ipc::reader::FileReader::try_new(File::open(path).expect("open"), None)
            .expect("arrow");
    let schema = reader.schema();
    let batches = reader.collect::<Result<Vec<_>, _>>().expect("batches");
    (schema, batches)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_output_format_round_trips_with_its_metadata() {
    let f = Fixture::start().await;
    let home = tempfile::tempdir().expect("tmp");
    let endpoint = f.server.endpoint();
    let sql = home.path().join("q.sql");
    std::fs::write(
        &sql,
        "SELECT district, COUNT(*) AS n FROM pop.residents GROUP BY district",
    )
    .expect("write");
    // One request id: every format shows the same recorded answer, and
    // only the first costs budget.
    let run = |format: &str, out: &Path| {
        veil(home.path())
            .args([
                "query",
                "--endpoint",
                &endpoint,
                "--token",
                "demo-token-op-univ-07",
                "--request-id",
                "formats-1",
                "--format",
                format,
                "-o",
            ])
            .arg(out)
            .arg("-f")
            .arg(&sql)
            .output()
            .expect("run")
    };
    let mut counts: Vec<(String, Vec<String>)> = Vec::new();
    for format in ["table", "csv", "json", "parquet", "arrow"] {
        let path = home.path().join(format!("answer.{format}"));
        let out = run(format, &path);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{format}: {}",
            text(&out.stderr)
        );
        let sidecar = home.path().join(format!("answer.{format}.meta.json"));
        if format == "table" {
            let table = std::fs::read_to_string(&path).expect("table");
            assert!(table.contains(" ± "), "{table}");
            assert!(table.contains("16 rows · cost 0.500000 epsilon"), "{table}");
            assert!(!sidecar.exists());
            continue;
        }
        let md: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&sidecar).expect("sidecar")).expect("json");
        assert_eq!(md["rows"], 16, "{format}");
        assert_eq!(md["metadata"][meta::COST], "0.500000", "{format}");
        assert!(
            md["columns"]["n"]["metadata"][meta::CI95].is_string(),
            "{format}: {md}"
        );
        let values: Vec<String> = match format {
            "csv" => {
                let text = std::fs::read_to_string(&path).expect("csv");
                let mut lines = text.lines();
                assert_eq!(lines.next(), Some("district,n"));
                lines
                    .map(|l| l.split(',').nth(1).expect("n").to_owned())
                    .collect()
            }
            "json" => std::fs::read_to_string(&path)
                .expect("json")
                .lines()
                .map(|l| {
                    let v: serde_json::Value = serde_json::from_str(l).expect("row");
                    v["n"].to_string()
                })
                .collect(),
            _ => {
                let (schema, batches) = if format == "parquet" {
                    reread_parquet(&path)
                } else {
                    reread_arrow(&path)
                };
                // veil's metadata survives in the file's own schema.
                assert_eq!(schema.metadata()[meta::COST], "0.500000", "{format}");
                assert!(
                    schema
                        .field_with_name("n")
                        .expect("n")
                        .metadata()
                        .contains_key(meta::CI95),
                    "{format}"
                );
                let fetched = veil::client::Fetched {
                    promised: schema.clone(),
                    schema,
                    batches,
                };
                column_strings(&fetched, "n")
            }
        };
        assert_eq!(values.len(), 16, "{format}");
        counts.push((format.to_owned(), values));
    }
    for (format, values) in &counts[1..] {
        assert_eq!(values, &counts[0].1, "{format} and csv show one answer");
    }
    assert_eq!(f.charges(), 1, "replays are free");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_codes_tell_refusals_usage_errors_and_outages_apart() {
    let f = Fixture::start().await;
    let home = tempfile::tempdir().expect("tmp");
    let endpoint = f.server.endpoint();
    let query = |endpoint: &str, token: &str, sql: &str| {
        veil(home.path())
            .args(["query", "--endpoint", endpoint, "--token", token, sql])
            .output()
            .expect("run")
    };
    let out = query(
        &endpoint,
        "demo-token-op-univ-07",
        "SELECT * FROM pop.residents",
    );
    assert_eq!(out.status.code(), Some(1), "refused by policy");
    assert!(text(&out.stderr).contains("PROJECT_PRIVATE_COLUMN"));
    let out = query(
        &endpoint,
        "not-a-token",
        "SELECT COUNT(*) FROM pop.residents",
    );
    assert_eq!(out.status.code(), Some(4), "{}", text(&out.stderr));
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let out = query(
        &format!("http://127.0.0.1:{closed}"),
        "demo-token-op-univ-07",
        "SELECT COUNT(*) FROM pop.residents",
    );
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
    let out = veil(home.path()).arg("catalog").output().expect("run");
    assert_eq!(out.status.code(), Some(2), "not logged in");
    assert!(
        text(&out.stderr).contains("veil login"),
        "{}",
        text(&out.stderr)
    );

    let out = veil(home.path())
        .args(["completions", "bash"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(0));
    assert!(
        text(&out.stdout).contains("catalog"),
        "completes subcommands"
    );
    let out = veil(home.path())
        .args(["query", "--help"])
        .output()
        .expect("run");
    let help = text(&out.stdout);
    assert!(
        help.contains("Example: veil query") && help.contains("Exit codes:"),
        "{help}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shell_completes_granted_names_and_answers_in_a_terminal() {
    let f = Fixture::start().await;
    let home = tempfile::tempdir().expect("tmp");
    let endpoint = f.server.endpoint();
    let home_path = home.path().to_owned();
    // rexpect blocks: drive the terminal off the async threads.
    tokio::task::spawn_blocking(move || {
        #[allow(
            clippy::disallowed_methods,
            reason = "a pseudo-terminal needs a std Command"
        )]
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_veil"));
        command
            .env("VEIL_CONFIG", home_path.join("config.toml"))
            .env("XDG_STATE_HOME", home_path.join("state"))
            .env("TERM", "xterm")
            .args([
                "shell",
                "--endpoint",
                &endpoint,
                "--token",
                "demo-token-op-univ-07",
            ]);
        let mut p = rexpect::session::spawn_command(command, Some(20_000)).expect("spawn");
        p.exp_string("veil> ").expect("prompt");
        p.send_line("\\d").expect("send");
        p.exp_string("wjw.outpatient_visits").expect("catalog");
        p.exp_string("veil> ").expect("prompt");
        // Tab completes the granted table's name.
        p.send("SELECT district, COUNT(*) AS n FROM pop.resi")
            .expect("send");
        p.send("\t").expect("tab");
        p.send_line(" GROUP BY district").expect("send");
        p.exp_string(" ...> ").expect("continuation");
        p.send_line(";").expect("send");
        // rexpect reads bytes as Latin-1: match ASCII only.
        p.exp_string("16 rows").expect("answer");
        p.exp_string("cost 0.500000 epsilon").expect("footer");
        p.send_line("SELECT * FROM pop.residents;").expect("send");
        p.exp_string("PROJECT_PRIVATE_COLUMN").expect("refusal");
        p.exp_string("veil> ").expect("prompt after a refusal");
        p.send_line("\\q").expect("send");
        p.exp_eof().expect("exit");
        let history =
            std::fs::read_to_string(home_path.join("state/veil/history")).expect("history");
        assert!(history.contains("pop.residents"), "{history}");
        let mode = std::fs::metadata(home_path.join("state/veil/history"))
            .expect("history")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "query texts are the owner's");
    })
    .await
    .expect("shell test");
    assert_eq!(f.charges(), 1);
}
