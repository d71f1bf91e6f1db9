//! What standard Flight SQL clients ask before and beside queries: the
//! catalog (only what the caller's grants expose), server info, and prepared
//! statements with bound parameters.

use std::sync::Arc;

use datafusion::arrow::array::{Int64Array, RecordBatch, StringArray};
use datafusion::arrow::datatypes::{DataType, Field, Schema};
use veil_engine::audit_log;
use veil_engine::listing::keys;

use crate::support::*;

fn columns(schema: &Schema) -> Vec<&str> {
    schema.fields().iter().map(|f| f.name().as_str()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_tables_shows_only_what_the_grants_in_force_expose() {
    let f = Fixture::start().await;

    let univ = f.client("op-univ-07").await.tables().await.expect("tables");
    let names: Vec<&str> = univ.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["pop.residents", "wjw.outpatient_visits"]);
    let (_, residents) = &univ[0];
    // Granted columns and the privacy unit, in file order; nothing else.
    let mut granted = columns(residents);
    granted.sort();
    assert_eq!(granted, ["age", "district", "gender", "person_id"]);
    let age = residents.field_with_name("age").expect("age").metadata();
    assert_eq!(age[keys::USES], "group_by,aggregate,filter,filter_literal");
    assert!(age.contains_key(keys::BOUNDS), "{age:?}");
    assert!(age.contains_key(keys::LEVEL), "{age:?}");
    let district = residents
        .field_with_name("district")
        .expect("district")
        .metadata();
    assert_eq!(district[keys::DOMAIN_SIZE], "16");
    assert_eq!(residents.metadata()[keys::GRANTS], "G-2026-031");
    assert_eq!(residents.metadata()[keys::PUBLIC], "false");
    assert_eq!(residents.metadata()[keys::UNIT], "person_id");

    // Another operator sees other datasets, with its grant's row filter.
    let credit = f
        .client("op-credit-01")
        .await
        .tables()
        .await
        .expect("tables");
    let names: Vec<&str> = credit.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["hrss.social_insurance", "samr.enterprises"]);
    assert_eq!(
        credit[0].1.metadata()[keys::ROW_FILTER],
        "pay_month >= '2024-01'"
    );

    // An expired grant exposes nothing.
    let expired = f.client("op-expired").await.tables().await.expect("tables");
    assert!(expired.is_empty(), "{expired:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catalogs_schemas_table_types_and_sql_info_answer_standard_clients() {
    let f = Fixture::start().await;
    let mut c = f.client("op-univ-07").await;
    let catalogs = c.catalogs().await.expect("catalogs");
    assert_eq!(catalogs, ["veil"]);
    let schemas = c.db_schemas().await.expect("schemas");
    assert_eq!(schemas, ["pop", "wjw"]);
    let types = c.table_types().await.expect("types");
    assert_eq!(types, ["TABLE"]);
    let info = c.sql_info().await.expect("sql info");
    assert_eq!(
        info.get("FLIGHT_SQL_SERVER_NAME").map(String::as_str),
        Some("veil")
    );
    assert_eq!(
        info.get("FLIGHT_SQL_SERVER_READ_ONLY").map(String::as_str),
        Some("true")
    );

    // Nothing is listed without authentication.
    let mut anonymous = veil::client::Client::connect(&f.server.endpoint())
        .await
        .expect("connect");
    let e = anonymous.tables().await.expect_err("refused");
    assert_eq!(e.code, tonic::Code::Unauthenticated);
}

fn one_int(name: &str, v: i64) -> RecordBatch {
    RecordBatch::try_new(
        Arc::new(Schema::new(vec![Field::new(name, DataType::Int64, true)])),
        vec![Arc::new(Int64Array::from(vec![v]))],
    )
    .expect("batch")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prepared_statement_binds_its_parameters_as_literals() {
    let f = Fixture::start().await;
    let mut c = f.client("op-univ-07").await;
    let sql = "SELECT district, COUNT(*) AS n FROM pop.residents WHERE age >= ? GROUP BY district";
    let r = c
        .query_prepared(sql, Some(one_int("min_age", 60)))
        .await
        .expect("released");
    assert_eq!(column_strings(&r, "district").len(), 16);
    assert_eq!(f.charges(), 1);
    // The audit log records the statement as it ran, parameters bound.
    let (entry, _) = audit_log::entries(&f.dir.path().join("state"))
        .expect("entries")
        .remove(0);
    assert_eq!(
        entry.entry.query.as_deref(),
        Some("SELECT district, COUNT(*) AS n FROM pop.residents WHERE age >= 60 GROUP BY district")
    );

    // A prepared statement without parameters runs like a statement.
    c.query_prepared(
        "SELECT gender, COUNT(*) AS n FROM pop.residents GROUP BY gender",
        None,
    )
    .await
    .expect("released");

    // Text parameters stay one literal: an injection attempt is a value.
    let text = RecordBatch::try_new(
        Arc::new(Schema::new(vec![Field::new("d", DataType::Utf8, true)])),
        vec![Arc::new(StringArray::from(vec!["x' OR '1'='1"]))],
    )
    .expect("batch");
    let r = c
        .query_prepared(
            "SELECT gender, COUNT(*) AS n FROM pop.residents WHERE district = ? GROUP BY gender",
            Some(text),
        )
        .await;
    // district may be grouped but not filtered under G-2026-031.
    assert_refused(
        r,
        tonic::Code::PermissionDenied,
        &["COLUMN_USE_NOT_GRANTED"],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepared_statement_mistakes_are_refused_before_any_charge() {
    let f = Fixture::start().await;
    let mut c = f.client("op-univ-07").await;
    // Without parameters, a statement's columns are promised when it is
    // prepared (a dry run: nothing is charged).
    let schema = c
        .prepared_schema("SELECT gender, COUNT(*) AS n FROM pop.residents GROUP BY gender")
        .await
        .expect("prepared");
    assert_eq!(columns(&schema), ["gender", "n"]);
    // A statement that will be refused promises nothing, and is refused
    // (and audited) when executed.
    let refused = c
        .prepared_schema("SELECT * FROM pop.residents")
        .await
        .expect("prepared");
    assert!(refused.fields().is_empty());
    assert_refused(
        c.query_prepared("SELECT * FROM pop.residents", None).await,
        tonic::Code::PermissionDenied,
        &["PROJECT_PRIVATE_COLUMN"],
    );
    let entries = audit_log::entries(&f.dir.path().join("state")).expect("entries");
    assert_eq!(
        entries
            .last()
            .and_then(|(e, _)| e.entry.rule.clone())
            .as_deref(),
        Some("PROJECT_PRIVATE_COLUMN")
    );
    let with_parameter = c
        .prepared_schema("SELECT COUNT(*) FROM pop.residents WHERE age >= ?")
        .await
        .expect("prepared");
    assert!(with_parameter.fields().is_empty(), "known once bound");
    let sql = "SELECT district, COUNT(*) AS n FROM pop.residents WHERE age >= ? GROUP BY district";
    // Executed without binding.
    assert_refused(
        c.query_prepared(sql, None).await,
        tonic::Code::InvalidArgument,
        &["INVALID_SQL", "parameter 1"],
    );
    // A parameter the statement does not use.
    assert_refused(
        c.query_prepared(
            "SELECT district, COUNT(*) AS n FROM pop.residents GROUP BY district",
            Some(one_int("x", 1)),
        )
        .await,
        tonic::Code::InvalidArgument,
        &["INVALID_SQL"],
    );
    // Placeholders outside a prepared statement.
    assert_refused(
        c.query(sql).await,
        tonic::Code::InvalidArgument,
        &["not bound"],
    );
    assert_eq!(f.charges(), 0);
}
