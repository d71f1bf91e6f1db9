"""Drive a running `veil serve` with the Python ADBC Flight SQL driver.

Usage: python adbc_smoke.py grpc://127.0.0.1:PORT

The driver's `execute` first tries a prepared statement and falls back to a
plain statement on UNIMPLEMENTED, and checks the promised schema against the
streamed one: this script proves both work with veil. Exits non-zero on any
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


for bearer in (False, True):
    how = "bearer" if bearer else "handshake"
    with connect("op-univ-07", bearer) as conn, conn.cursor() as cur:
        cur.execute("SELECT district, COUNT(*) AS residents FROM pop.residents GROUP BY district")
        table = cur.fetch_arrow_table()
        check(f"{how}: count by district returns 16 districts", table.num_rows == 16, str(table.num_rows))
        md = table.schema.field("residents").metadata or {}
        check(f"{how}: interval metadata present", b"veil.ci95_half_width" in md, str(md))
        smd = table.schema.metadata or {}
        check(f"{how}: budget metadata present", b"veil.budget_remaining" in smd, str(smd))
        try:
            cur.execute("SELECT * FROM pop.residents")
            cur.fetch_arrow_table()
            check(f"{how}: raw rows refused", False, "no error")
        except flightsql.Error as e:
            check(f"{how}: raw rows refused", "PROJECT_PRIVATE_COLUMN" in str(e), str(e))

failed = checks.count(False)
print(f"{len(checks) - failed} passed, {failed} failed")
sys.exit(1 if failed else 0)
