"""Drive a running `veil serve` with the Python ADBC Flight SQL driver.

Usage: python adbc_smoke.py grpc://127.0.0.1:PORT

Run against a server with a fresh state directory (the budget checks count
on it). The driver's `execute` goes through Flight SQL prepared statements
and checks the promised schema against the streamed one: this script proves
both work with veil. Every check runs twice, logged in with username and
password (Flight handshake) and with a bearer header. Exits non-zero on any
failure and prints 'N passed, 0 failed' at the end.
"""

import sys

import adbc_driver_flightsql.dbapi as flightsql
from adbc_driver_flightsql import DatabaseOptions

uri = sys.argv[1]
checks = []


def check(name, ok, detail=""):
    checks.append(ok)
    print(("ok   " if ok else "FAIL ") + name + (f": {detail}" if detail and not ok else ""))


def connect(operator, bearer=False):
    if bearer:
        return flightsql.connect(uri, db_kwargs={
            DatabaseOptions.AUTHORIZATION_HEADER.value: f"Bearer demo-token-{operator}",
        })
    return flightsql.connect(uri, db_kwargs={
        "username": operator,
        "password": f"demo-token-{operator}",
    })


def refused(cur, sql, params=None):
    """The exception a statement raises, or None."""
    try:
        cur.execute(sql, params)
        cur.fetch_arrow_table()
        return None
    except flightsql.Error as e:
        return e


for bearer in (False, True):
    how = "bearer" if bearer else "handshake"
    with connect("op-univ-07", bearer) as conn, conn.cursor() as cur:
        # The catalog lists exactly the granted datasets, with their columns.
        objects = conn.adbc_get_objects(depth="columns").read_all().to_pylist()
        tables = sorted(
            f"{schema['db_schema_name']}.{table['table_name']}"
            for catalog in objects
            for schema in catalog["catalog_db_schemas"] or []
            for table in schema["db_schema_tables"] or []
        )
        check(f"{how}: catalog lists the granted datasets", tables == ["pop.residents", "wjw.outpatient_visits"], str(tables))
        schema = conn.adbc_get_table_schema("residents", db_schema_filter="pop")
        check(f"{how}: table schema shows granted columns only", sorted(schema.names) == ["age", "district", "gender", "person_id"], str(schema.names))
        uses = (schema.field("age").metadata or {}).get(b"veil.uses", b"")
        check(f"{how}: column metadata names the allowed uses", b"aggregate" in uses, str(uses))

        cur.execute("SELECT district, COUNT(*) AS residents FROM pop.residents GROUP BY district")
        table = cur.fetch_arrow_table()
        check(f"{how}: count by district returns 16 districts", table.num_rows == 16, str(table.num_rows))
        md = table.schema.field("residents").metadata or {}
        check(f"{how}: interval metadata present", b"veil.ci95_half_width" in md, str(md))
        smd = table.schema.metadata or {}
        check(f"{how}: budget metadata present", b"veil.budget_remaining" in smd, str(smd))

        cur.execute(
            "SELECT gender, COUNT(*) AS n FROM pop.residents WHERE age >= ? GROUP BY gender",
            parameters=(60,),
        )
        table = cur.fetch_arrow_table()
        check(f"{how}: prepared statement with a parameter", table.num_rows >= 1 and "n" in table.schema.names, str(table))

        e = refused(cur, "SELECT * FROM pop.residents")
        check(
            f"{how}: raw rows refused as ProgrammingError naming the rule",
            isinstance(e, flightsql.ProgrammingError) and "PROJECT_PRIVATE_COLUMN" in str(e),
            f"{type(e).__name__}: {e}",
        )

    # op-ndrc's grant holds ε = 2 at 0.5 per query: the fifth query and
    # every one after it are refused (the bearer round finds it spent).
    with connect("op-ndrc", bearer) as conn, conn.cursor() as cur:
        errors = [refused(cur, "SELECT district, COUNT(*) AS n FROM hrss.social_insurance GROUP BY district") for _ in range(5)]
        last = errors[-1]
        check(
            f"{how}: budget exhaustion refused with the rule",
            last is not None and "BUDGET_EXHAUSTED" in str(last),
            f"{type(last).__name__}: {last}",
        )

failed = checks.count(False)
print(f"{len(checks) - failed} passed, {failed} failed")
sys.exit(1 if failed else 0)
