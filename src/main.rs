//! The `veil` command.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use veil::output::Format;
use veil::session::ConnectArgs;

#[derive(Parser)]
#[command(
    name = "veil",
    version,
    about = "Privacy-preserving SQL over public data: usable but not visible (数据可用不可见).",
    after_help = veil::exit::HELP
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve Arrow Flight SQL (and veil.v1) over gRPC.
    ///
    /// Example: veil serve --policy examples/beijing/policy.toml --data examples/beijing/data --state state --listen 127.0.0.1:50051
    Serve {
        /// Policy file (TOML).
        #[arg(long)]
        policy: PathBuf,
        /// Data directory the policy's sources are relative to.
        #[arg(long)]
        data: PathBuf,
        /// State directory (privacy-budget ledger).
        #[arg(long)]
        state: PathBuf,
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:50051")]
        listen: SocketAddr,
        /// The weakest executor sandbox to accept: strict (Landlock and
        /// seccomp), landlock, or none. `veil doctor` shows what this
        /// machine reaches.
        #[arg(long, default_value = "strict")]
        min_sandbox: veil_sandbox::Level,
        /// Executor processes kept ready.
        #[arg(long, default_value_t = 2)]
        workers: usize,
        /// Wall-clock limit of one query's execution, in seconds; the
        /// executor is killed when it passes.
        #[arg(long, default_value_t = 60)]
        query_deadline: u64,
        /// Memory limit of one executor (address space), in MiB.
        #[arg(long, default_value_t = 4096)]
        worker_memory: u64,
        /// Serve over TLS with this certificate chain (PEM).
        #[arg(long, requires = "tls_key")]
        tls_cert: Option<PathBuf>,
        /// Private key (PEM) of --tls-cert.
        #[arg(long, requires = "tls_cert")]
        tls_key: Option<PathBuf>,
        /// Accept client certificates signed by this CA (PEM): mTLS, where a
        /// certificate's subject names its operator (`mtls = { subject = … }`
        /// in the policy). Tokens keep working.
        #[arg(long, requires = "tls_cert")]
        client_ca: Option<PathBuf>,
    },
    /// Show how well this machine confines executors, and why.
    ///
    /// Starts one executor the way `veil serve` does, and prints the sandbox
    /// level it reached with every confinement step and self-test.
    ///
    /// Example: veil doctor
    Doctor {
        /// Data directory the executor may read (default: an empty one).
        #[arg(long)]
        data: Option<PathBuf>,
    },
    /// An executor process; `veil serve` starts these itself.
    #[command(hide = true)]
    Worker {
        #[arg(long)]
        data: PathBuf,
        #[arg(long)]
        memory_bytes: u64,
        #[arg(long)]
        cpu_seconds: u64,
        #[arg(long)]
        max_files: u64,
        #[arg(long)]
        parent: u32,
    },
    /// Log in to a veil server: checks the credentials with a Flight
    /// handshake and stores the endpoint and session token (never your
    /// operator token) in $XDG_CONFIG_HOME/veil/config.toml, mode 0600.
    ///
    /// Example: veil login --endpoint http://127.0.0.1:50051 --operator op-univ-07 --token demo-token-op-univ-07
    #[command(after_help = veil::exit::HELP)]
    Login {
        /// Server endpoint.
        #[arg(long, env = "VEIL_ENDPOINT")]
        endpoint: String,
        /// Your operator id.
        #[arg(long)]
        operator: String,
        /// Your operator token (read from standard input when absent).
        #[arg(long, env = "VEIL_TOKEN", hide_env_values = true)]
        token: Option<String>,
        /// CA certificate (PEM) of an https:// endpoint; remembered with the login.
        #[arg(long, env = "VEIL_CA_CERT")]
        ca_cert: Option<PathBuf>,
    },
    /// The datasets and columns your grants let you query, with each
    /// column's grading level, allowed uses, bounds and public key set.
    ///
    /// Example: veil catalog
    #[command(after_help = veil::exit::HELP)]
    Catalog {
        #[command(flatten)]
        connect: ConnectArgs,
    },
    /// Your grants (授权): purpose, validity, scope, limits, budget, pricing.
    ///
    /// Example: veil grants
    #[command(after_help = veil::exit::HELP)]
    Grants {
        #[command(flatten)]
        connect: ConnectArgs,
    },
    /// Run one SQL query against a veil server.
    ///
    /// Example: veil query "SELECT district, COUNT(*) FROM pop.residents GROUP BY district"
    ///
    /// Example: veil query --format parquet -o counts.parquet -f query.sql
    ///
    /// Example: veil query --dry-run "SELECT AVG(age) FROM pop.residents"
    #[command(after_help = veil::exit::HELP)]
    Query {
        #[command(flatten)]
        connect: ConnectArgs,
        /// Output format; machine formats written with -o get a
        /// `<file>.meta.json` sidecar with veil's metadata.
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
        /// Write the answer to this file instead of standard output.
        #[arg(short, long)]
        out: Option<PathBuf>,
        /// Show the cost and accuracy without running the query or spending budget.
        #[arg(long)]
        dry_run: bool,
        /// A request id of your choosing: sending the same query again with
        /// the same id returns the same answer without a new charge.
        #[arg(long)]
        request_id: Option<String>,
        /// Read the statement from this file.
        #[arg(short = 'f', long = "file", conflicts_with = "sql")]
        file: Option<PathBuf>,
        /// The SQL statement.
        #[arg(required_unless_present = "file")]
        sql: Option<String>,
    },
    /// An interactive SQL prompt with history and completion of the table
    /// and column names you may use.
    ///
    /// Example: veil shell
    #[command(after_help = veil::exit::HELP)]
    Shell {
        #[command(flatten)]
        connect: ConnectArgs,
    },
    /// Print a shell completion script.
    ///
    /// Example: veil completions bash > ~/.local/share/bash-completion/completions/veil
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Run the bundled Beijing example end to end.
    ///
    /// Generates the example data, starts a server with the example policy
    /// and runs a short tour as different operators.
    ///
    /// Example: veil demo --scale 0.1
    Demo {
        /// Data scale (1 ≈ 200,000 residents).
        #[arg(long, default_value_t = 1.0)]
        scale: f64,
    },
    /// Write the synthetic Beijing example datasets.
    ///
    /// Example: veil generate --out data --scale 0.5
    Generate {
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
        /// Multiplies the default size (1 ≈ 200,000 residents).
        #[arg(long, default_value_t = 1.0)]
        scale: f64,
        /// Random seed of the generator.
        #[arg(long, default_value_t = veil::generate::DEFAULT_SEED)]
        seed: u64,
    },
    /// Policy tools for security officers.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// Privacy budgets: an operator's remaining budget, from a server; or,
    /// for security officers, every grant's and dataset's consumption, read
    /// from the state directory (safe while the server runs).
    ///
    /// Example: veil budget
    ///
    /// Example: veil budget --policy examples/beijing/policy.toml --state state
    #[command(after_help = veil::exit::HELP)]
    Budget {
        #[command(flatten)]
        connect: ConnectArgs,
        /// Policy file (officers).
        #[arg(long, requires = "state")]
        policy: Option<PathBuf>,
        /// State directory (officers).
        #[arg(long, requires = "policy")]
        state: Option<PathBuf>,
    },
    /// The audit log (审计日志) of a state directory.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Check the hash chain, the Merkle tree and every checkpoint signature;
    /// exit 1 on any sign of tampering.
    ///
    /// Example: veil audit verify --state state
    Verify {
        /// State directory.
        #[arg(long)]
        state: PathBuf,
    },
    /// Print the inclusion proof (JSON) of one entry in the latest checkpoint.
    ///
    /// Example: veil audit prove --state state 41
    Prove {
        /// State directory.
        #[arg(long)]
        state: PathBuf,
        /// The entry's index (a response's `veil.audit_index`).
        index: u64,
    },
    /// Export entries for the supervising agency, after verifying the log.
    ///
    /// Example: veil audit export --state state --since 2026-11-01T00:00:00+08:00 --format parquet -o audit.parquet
    Export {
        /// State directory.
        #[arg(long)]
        state: PathBuf,
        /// Only entries at or after this time (RFC 3339).
        #[arg(long)]
        since: Option<String>,
        /// `jsonl` or `parquet`.
        #[arg(long, default_value = "jsonl")]
        format: String,
        /// Output file (standard output for jsonl when absent).
        #[arg(short, long)]
        out: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Check policy files; exit 1 with every problem found.
    ///
    /// Example: veil policy check examples/beijing/policy.toml
    Check {
        /// Policy files.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Explain in plain words what an operator may do, or who may use a dataset.
    ///
    /// Example: veil policy explain --policy examples/beijing/policy.toml --operator op-univ-07
    Explain {
        /// Policy file.
        #[arg(long)]
        policy: PathBuf,
        /// Operator id.
        #[arg(long, conflicts_with = "dataset", required_unless_present = "dataset")]
        operator: Option<String>,
        /// Dataset id (schema.table).
        #[arg(long)]
        dataset: Option<String>,
    },
    /// Print the JSON Schema of the policy format (for editor completion).
    ///
    /// Example: veil policy schema > policy.schema.json
    Schema,
    /// Show what changed in effective permissions between two policies.
    ///
    /// Example: veil policy diff old.toml new.toml
    Diff {
        /// The policy before the change.
        old: PathBuf,
        /// The policy after the change.
        new: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    veil::install_panic_hook();
    if let Command::Worker {
        data,
        memory_bytes,
        cpu_seconds,
        max_files,
        parent,
    } = cli.command
    {
        // Nothing before confinement: no logging, no runtime, no files.
        let args = veil_sandbox::worker::WorkerArgs {
            data_dir: data,
            limits: veil_sandbox::Limits {
                memory_bytes,
                cpu_seconds,
                max_files,
            },
            parent,
        };
        return veil_sandbox::worker::serve(
            &args,
            || veil_engine::execute::worker_warm(&args.data_dir, memory_bytes),
            veil_engine::execute::worker_prepare,
            veil_engine::execute::worker_job,
        );
    }
    let default_level = match cli.command {
        Command::Serve { .. } => "info",
        _ => "warn",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("VEIL_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level)),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            let code = if let Some(exit) = e.downcast_ref::<veil::session::Exit>() {
                exit.code
            } else if e
                .chain()
                .any(|c| c.downcast_ref::<tonic::transport::Error>().is_some())
            {
                veil::exit::UNAVAILABLE
            } else {
                veil::exit::USAGE
            };
            ExitCode::from(code)
        }
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Serve {
            policy,
            data,
            state,
            listen,
            min_sandbox,
            workers,
            query_deadline,
            worker_memory,
            tls_cert,
            tls_key,
            client_ca,
        } => runtime()?.block_on(async {
            let tls = match (&tls_cert, &tls_key) {
                (Some(c), Some(k)) => {
                    Some(veil::ServerTls::from_files(c, k, client_ca.as_deref())?)
                }
                _ => None,
            };
            let mut sandbox = veil::SandboxOptions::this_program()?;
            sandbox.min_level = min_sandbox;
            sandbox.workers = workers;
            sandbox.deadline = std::time::Duration::from_secs(query_deadline);
            sandbox.limits.memory_bytes = worker_memory << 20;
            // The CPU limit backs up the deadline: a worker that somehow
            // outlives its SIGKILL still cannot compute for long.
            sandbox.limits.cpu_seconds = query_deadline.saturating_mul(2).max(1);
            let engine =
                veil::open_engine(&policy, &data, &state, &veil::Execution::Sandboxed(sandbox))?;
            let _watcher = veil::watch_policy(engine.clone(), policy.clone());
            let running = veil::start_with_tls(engine, listen, tls).await?;
            tracing::info!(addr = %running.addr, "serving Arrow Flight SQL");
            tokio::signal::ctrl_c().await?;
            running.stop().await?;
            Ok(ExitCode::SUCCESS)
        }),
        Command::Login {
            endpoint,
            operator,
            token,
            ca_cert,
        } => {
            let token = match token {
                Some(t) => t,
                None => {
                    if std::io::stdin().is_terminal() {
                        eprint!("token for {operator}: ");
                    }
                    let mut line = String::new();
                    std::io::stdin().read_line(&mut line)?;
                    line.trim().to_owned()
                }
            };
            let code = runtime()?.block_on(veil::operator::login(
                &endpoint,
                &operator,
                &token,
                ca_cert.as_deref(),
            ))?;
            Ok(ExitCode::from(code))
        }
        Command::Catalog { connect } => {
            let target = connect.resolve()?;
            let code = runtime()?.block_on(veil::operator::catalog(&target))?;
            Ok(ExitCode::from(code))
        }
        Command::Grants { connect } => {
            let target = connect.resolve()?;
            let code = runtime()?.block_on(veil::operator::grants(&target))?;
            Ok(ExitCode::from(code))
        }
        Command::Shell { connect } => {
            let target = connect.resolve()?;
            let code = runtime()?.block_on(veil::shell::run(&target))?;
            Ok(ExitCode::from(code))
        }
        Command::Completions { shell } => {
            use clap::CommandFactory as _;
            clap_complete::generate(shell, &mut Cli::command(), "veil", &mut std::io::stdout());
            Ok(ExitCode::SUCCESS)
        }
        Command::Query {
            connect,
            format,
            out,
            dry_run,
            request_id,
            file,
            sql,
        } => {
            let target = connect.resolve()?;
            let sql = match (sql, file) {
                (Some(s), _) => s,
                (None, Some(f)) => std::fs::read_to_string(&f)
                    .with_context(|| format!("cannot read {}", f.display()))?,
                (None, None) => anyhow::bail!("give a statement or -f FILE"),
            };
            let options = veil::operator::QueryOptions {
                sql,
                format,
                out,
                dry_run,
                request_id,
            };
            let code = runtime()?.block_on(veil::operator::query(&target, &options))?;
            Ok(ExitCode::from(code))
        }
        Command::Demo { scale } => runtime()?
            .block_on(veil::demo::run(scale))
            .map(|_| ExitCode::SUCCESS),
        Command::Generate { out, scale, seed } => {
            let s = veil::generate::generate(&out, scale, seed)?;
            println!(
                "wrote {}: {} residents, {} social-insurance rows, {} outpatient visits, {} enterprises",
                out.display(),
                s.residents,
                s.insurance_rows,
                s.visits,
                s.enterprises
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Policy { command } => policy_command(command),
        Command::Budget {
            connect,
            policy,
            state,
        } => budget_command(connect, policy, state),
        Command::Audit { command } => audit_command(command),
        Command::Doctor { data } => doctor(data),
        Command::Worker { .. } => unreachable!("handled in main"),
    }
}

fn doctor(data: Option<PathBuf>) -> Result<ExitCode> {
    let empty = tempfile::tempdir()?;
    let data = match data {
        Some(d) => d,
        None => empty.path().to_owned(),
    };
    let sandbox = veil::SandboxOptions::this_program()?;
    let pool = veil_sandbox::pool::Pool::start(veil_sandbox::pool::PoolConfig {
        program: sandbox.program,
        subcommand: vec!["worker".into()],
        data_dir: data.canonicalize()?,
        limits: sandbox.limits,
        size: 1,
        deadline: sandbox.deadline,
        min_level: veil_sandbox::Level::None,
    })
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    let report = pool.report();
    print!("{}", report.explain());
    println!(
        "{}",
        match report.level {
            veil_sandbox::Level::Strict =>
                "`veil serve` runs with its default --min-sandbox strict.",
            veil_sandbox::Level::Landlock =>
                "seccomp is unavailable: `veil serve` needs --min-sandbox landlock here.",
            veil_sandbox::Level::None =>
                "Landlock is unavailable: executors are not confined to the data directory; `veil serve` needs --min-sandbox none here.",
        }
    );
    Ok(ExitCode::SUCCESS)
}

fn budget_command(
    connect: ConnectArgs,
    policy: Option<PathBuf>,
    state: Option<PathBuf>,
) -> Result<ExitCode> {
    if policy.is_none() && state.is_none() {
        let target = connect.resolve()?;
        let code = runtime()?.block_on(veil::operator::budget(&target))?;
        return Ok(ExitCode::from(code));
    }
    let (Some(policy), Some(state)) = (policy, state) else {
        anyhow::bail!(
            "give --policy and --state together (every budget), or neither (your own budget from the server)"
        );
    };
    let p = load_policy(&policy)?;
    let view = veil_engine::ledger::LedgerView::open(&state)?;
    let now = chrono::Utc::now().timestamp_millis();
    println!(
        "{:<40} {:>14} {:>14}  unit     refreshes",
        "budget", "spent", "total"
    );
    for line in veil_engine::broker::budget_report(&p, &view, None, now)? {
        println!(
            "{:<40} {:>14.6} {:>14.6}  {:<8} {}",
            line.budget,
            line.spent,
            line.total,
            line.unit,
            line.refreshes.as_deref().unwrap_or("never")
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn audit_command(command: AuditCommand) -> Result<ExitCode> {
    use veil_engine::audit_log;
    match command {
        AuditCommand::Verify { state } => match audit_log::verify(&state) {
            Ok(v) => {
                println!(
                    "ok — {} entries, {} signed checkpoints, root {}",
                    v.size, v.checkpoints, v.root
                );
                Ok(ExitCode::SUCCESS)
            }
            Err(why) => {
                eprintln!("TAMPERED: {why}");
                Ok(ExitCode::from(1))
            }
        },
        AuditCommand::Prove { state, index } => match audit_log::prove(&state, index) {
            Ok(proof) => {
                println!("{}", serde_json::to_string_pretty(&proof)?);
                Ok(ExitCode::SUCCESS)
            }
            Err(why) => {
                eprintln!("no proof: {why}");
                Ok(ExitCode::from(1))
            }
        },
        AuditCommand::Export {
            state,
            since,
            format,
            out,
        } => {
            if let Err(why) = audit_log::verify(&state) {
                eprintln!("TAMPERED: {why}; nothing exported");
                return Ok(ExitCode::from(1));
            }
            let since = since
                .map(|s| {
                    chrono::DateTime::parse_from_rfc3339(&s).context("--since is not RFC 3339")
                })
                .transpose()?;
            let entries: Vec<audit_log::Stored> = audit_log::entries(&state)
                .map_err(|e| anyhow::anyhow!(e))?
                .into_iter()
                .map(|(stored, _)| stored)
                .filter(|s| {
                    since.is_none_or(|since| {
                        chrono::DateTime::parse_from_rfc3339(&s.entry.time)
                            .is_ok_and(|t| t >= since)
                    })
                })
                .collect();
            match format.as_str() {
                "jsonl" => {
                    let mut text = String::new();
                    for e in &entries {
                        text.push_str(&serde_json::to_string(e)?);
                        text.push('\n');
                    }
                    match out {
                        Some(path) => std::fs::write(&path, text)?,
                        None => print!("{text}"),
                    }
                }
                "parquet" => {
                    let path = out.context("--format parquet needs -o FILE")?;
                    let batch = audit_log::export_batch(&entries)?;
                    let file = std::fs::File::create(&path)?;
                    let mut w = datafusion::parquet::arrow::ArrowWriter::try_new(
                        file,
                        batch.schema(),
                        None,
                    )?;
                    w.write(&batch)?;
                    w.close()?;
                }
                other => anyhow::bail!("unknown format `{other}`: jsonl or parquet"),
            }
            eprintln!("exported {} entries", entries.len());
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn load_policy(path: &std::path::Path) -> Result<veil_policy::Policy> {
    veil_policy::Policy::load(path).map_err(|e| {
        eprint!("{}", e.render(std::io::stderr().is_terminal()));
        anyhow::anyhow!("{} is not a valid policy", path.display())
    })
}

fn policy_command(command: PolicyCommand) -> Result<ExitCode> {
    let now = chrono::Utc::now().fixed_offset();
    match command {
        PolicyCommand::Check { files } => {
            let mut ok = true;
            for f in files {
                match veil_policy::Policy::load(&f) {
                    Ok(p) => println!(
                        "{}: ok — policy {} v{}: {} datasets, {} operators, {} grants; sha256 {}",
                        f.display(),
                        p.id,
                        p.version,
                        p.datasets.len(),
                        p.operators.len(),
                        p.grants.len(),
                        p.hash
                    ),
                    Err(e) => {
                        ok = false;
                        eprint!("{}", e.render(std::io::stderr().is_terminal()));
                    }
                }
            }
            Ok(if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        PolicyCommand::Explain {
            policy,
            operator,
            dataset,
        } => {
            let p = load_policy(&policy)?;
            let text = match (&operator, &dataset) {
                (Some(op), _) => veil_policy::explain::explain_operator(&p, op, now)
                    .ok_or_else(|| anyhow::anyhow!("no operator `{op}` in {}", policy.display()))?,
                (None, Some(ds)) => veil_policy::explain::explain_dataset(&p, ds, now)
                    .ok_or_else(|| anyhow::anyhow!("no dataset `{ds}` in {}", policy.display()))?,
                (None, None) => anyhow::bail!("give --operator or --dataset"),
            };
            print!("{text}");
            Ok(ExitCode::SUCCESS)
        }
        PolicyCommand::Schema => {
            print!("{}", veil_policy::json_schema());
            Ok(ExitCode::SUCCESS)
        }
        PolicyCommand::Diff { old, new } => {
            let (a, b) = (load_policy(&old)?, load_policy(&new)?);
            let changes = veil_policy::diff::diff(&a, &b);
            if changes.is_empty() {
                println!("no change in effective permissions");
            }
            for c in changes {
                println!("{c}");
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
