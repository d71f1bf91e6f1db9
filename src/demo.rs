//! `veil demo`: the bundled Beijing example, end to end through the real
//! Flight SQL path, as several operators.

use std::path::{Path, PathBuf};

use anyhow::{Result, bail};
use tonic::Code;

use crate::client::Client;
use crate::output::{Format, render};

/// Where the bundled example lives.
pub fn example_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/beijing")
}

struct Step<'a> {
    title: &'a str,
    operator: &'a str,
    sql: &'a str,
    expect: Option<Code>,
}

/// Runs the tour; fails if any step does not behave as the policy says.
pub async fn run(scale: f64) -> Result<()> {
    let dir = example_dir();
    let data = dir.join("data");
    println!("veil demo: Beijing public data, usable but not visible (数据可用不可见)\n");
    let started = std::time::Instant::now();
    if let Some(s) = crate::generate::ensure(&data, scale)? {
        println!(
            "generated example data in {:.1}s: {} residents, {} social-insurance rows, {} outpatient visits, {} enterprises\n",
            started.elapsed().as_secs_f64(),
            s.residents,
            s.insurance_rows,
            s.visits,
            s.enterprises
        );
    }
    let state = tempfile::tempdir()?;
    // The demo confines its executors like `veil serve`, at whatever level
    // this kernel allows (`veil doctor` explains it).
    let mut sandbox = crate::SandboxOptions::this_program()?;
    sandbox.min_level = veil_sandbox::Level::None;
    let engine = crate::open_engine(
        &dir.join("policy.toml"),
        &data,
        state.path(),
        &crate::Execution::Sandboxed(sandbox),
    )?;
    println!(
        "policy {} v{} (sha256 {}…)",
        engine.policy().id,
        engine.policy().version,
        &engine.policy().hash[..12]
    );
    println!(
        "executors: confined worker processes, sandbox level {} (`veil doctor` explains it)",
        engine.executor().level()
    );
    let server = crate::start(engine, "127.0.0.1:0".parse()?).await?;
    println!("serving Arrow Flight SQL on {}\n", server.endpoint());

    let steps = [
        Step {
            title: "1. A university (op-univ-07, public welfare) counts residents by district",
            operator: "op-univ-07",
            sql: "SELECT district, COUNT(*) AS residents FROM pop.residents GROUP BY district",
            expect: None,
        },
        Step {
            title: "2. A credit bureau (op-credit-01, commercial) averages 2025 wage bases by district",
            operator: "op-credit-01",
            sql: "SELECT district, AVG(wage_base) AS avg_wage_base, COUNT(*) AS paid_months \
                  FROM hrss.social_insurance WHERE pay_month >= '2025-01' GROUP BY district ORDER BY district",
            expect: None,
        },
        Step {
            title: "3. The university links visits to residents on the person (关联分析): visits and spending per patient, by gender",
            operator: "op-univ-07",
            sql: "WITH per AS (SELECT patient_id, COUNT(*) AS visits, SUM(cost) AS spend \
                  FROM wjw.outpatient_visits GROUP BY patient_id) \
                  SELECT r.gender, AVG(p.visits) AS visits_per_patient, AVG(p.spend) AS spend_per_patient \
                  FROM per p JOIN pop.residents r ON p.patient_id = r.person_id GROUP BY r.gender",
            expect: None,
        },
        Step {
            title: "4. The university asks for raw rows: refused before any data is read",
            operator: "op-univ-07",
            sql: "SELECT * FROM pop.residents",
            expect: Some(Code::PermissionDenied),
        },
        Step {
            title: "5. An operator whose grant expired in 2025 tries again",
            operator: "op-expired",
            sql: "SELECT district, AVG(age) FROM pop.residents GROUP BY district",
            expect: Some(Code::PermissionDenied),
        },
    ];
    for step in &steps {
        println!("{}\n  {}\n", step.title, step.sql);
        let mut client = Client::connect(&server.endpoint()).await?;
        client
            .login(step.operator, &format!("demo-token-{}", step.operator))
            .await
            .map_err(crate::client::explain)?;
        match (client.query(step.sql).await, step.expect) {
            (Ok(fetched), None) => print!("{}", render(&fetched, Format::Table)?),
            (Err(e), Some(code)) if e.code == code => {
                println!("  refused ({:?}): {}", e.code, e.message)
            }
            (Ok(_), Some(code)) => bail!("step should have been refused with {code:?}"),
            (Err(e), _) => bail!("step failed: {} ({:?})", e.message, e.code),
        }
        println!();
    }

    println!("6. Remaining privacy budget (veil.v1.GetBudget)");
    for operator in ["op-credit-01", "op-univ-07"] {
        let budget = crate::client::budget(&crate::client::Target::new(
            &server.endpoint(),
            &format!("demo-token-{operator}"),
        ))
        .await?;
        for g in budget.grants {
            println!(
                "  {operator:<13} grant {:<11} {:.4} of {:.4} {} remaining",
                g.grant_id, g.remaining, g.total, g.unit
            );
        }
    }
    server.stop().await?;
    println!("\ndone in {:.1}s", started.elapsed().as_secs_f64());
    Ok(())
}
