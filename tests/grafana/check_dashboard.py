#!/usr/bin/env python3
"""Checks docs/grafana/ccluster.json against the Prometheus series ccluster exports:

    python3 tests/grafana/check_dashboard.py [--promtool PATH] [DASHBOARD.json]

- the file is JSON, with schemaVersion 39, a DS_PROMETHEUS datasource input and the `workflow`
  variable;
- every PromQL expression (panels and variables) names only series from SERIES below, and only
  labels that those series have (plus `le` for histogram buckets);
- with --promtool (Prometheus's promtool, e.g. from scripts/prometheus-for-tests.sh's package),
  every expression also parses as PromQL, once Grafana's variables are replaced by sample values;
- with --prometheus (the path scripts/prometheus-for-tests.sh prints), a real Prometheus on
  127.0.0.1 scrapes synthetic series of every name above (from a small exporter this script
  serves on 127.0.0.1) for a few seconds, and every expression must return at least one sample.
  Both processes are stopped by PID.

Exits 0 and prints "N passed, 0 failed" when all hold. Only the standard library is needed.
"""

import http.server
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request

DASHBOARD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "docs", "grafana", "ccluster.json")

# The series ccluster exports (names final) and their labels.
COUNTERS_AND_GAUGES = {
    "ccluster_runs_started_total": {"ccluster_workflow"},
    "ccluster_runs_finished_total": {"ccluster_workflow", "ccluster_run_state"},
    "ccluster_runs_running": {"ccluster_workflow"},
    "ccluster_tasks_started_total": {"ccluster_workflow", "ccluster_task_kind"},
    "ccluster_tasks_finished_total": {"ccluster_workflow", "ccluster_task_state", "error_type"},
    "ccluster_tasks_running": {"ccluster_workflow"},
    "ccluster_agent_token_usage_total": {"ccluster_workflow", "gen_ai_request_model", "gen_ai_token_type", "ccluster_task"},
    "ccluster_agent_cost_total": {"ccluster_workflow", "gen_ai_request_model", "ccluster_task"},
    "ccluster_agent_api_retries_total": {"ccluster_workflow", "error_type"},
    "ccluster_run_budget_spent": {"ccluster_run", "ccluster_workflow"},
    "ccluster_run_budget_remaining": {"ccluster_run", "ccluster_workflow"},
    "ccluster_merges_total": {"ccluster_workflow", "ccluster_merge_outcome"},
    "ccluster_merge_conflicts_total": {"ccluster_workflow"},
}
HISTOGRAMS = {
    "ccluster_attempt_duration_seconds": {"ccluster_workflow", "ccluster_task_kind", "ccluster_attempt_outcome"},
    "ccluster_task_queue_wait_seconds": {"ccluster_workflow"},
    "ccluster_runner_operation_duration_seconds": {"ccluster_runner_kind", "ccluster_operation"},
}
SERIES = dict(COUNTERS_AND_GAUGES)
for name, labels in HISTOGRAMS.items():
    SERIES[f"{name}_bucket"] = labels | {"le"}
    SERIES[f"{name}_sum"] = labels
    SERIES[f"{name}_count"] = labels

# Sample values for Grafana's variables, so that promtool can parse the expressions.
VARIABLES = {"$__rate_interval": "1m", "$__range": "6h", "$__interval": "30s", "$workflow": ".*"}
# The same for a Prometheus that scrapes every second and has only seconds of data.
SHORT_VARIABLES = {"$__rate_interval": "5s", "$__range": "10s", "$__interval": "1s", "$workflow": ".*"}
HISTOGRAM_BOUNDS = ["0.1", "1", "10", "+Inf"]


def synthetic_exposition(scrape):
    """Prometheus text exposition of every series in SERIES, with values that grow on each scrape and
    two values per label (one with an empty error_type, as a successful task has)."""
    lines = []
    for name, labels in sorted(COUNTERS_AND_GAUGES.items()):
        for variant in range(2):
            values = {label: f"{label}-{variant}" for label in sorted(labels)}
            if "error_type" in values and variant == 0:
                values["error_type"] = ""
            rendered = ",".join(f'{k}="{v}"' for k, v in values.items())
            lines.append(f"{name}{{{rendered}}} {scrape * (variant + 1) + 1}")
    for name, labels in sorted(HISTOGRAMS.items()):
        for variant in range(2):
            rendered = ",".join(f'{label}="{label}-{variant}"' for label in sorted(labels))
            for index, bound in enumerate(HISTOGRAM_BOUNDS):
                lines.append(f'{name}_bucket{{{rendered},le="{bound}"}} {scrape * (index + 1)}')
            lines.append(f"{name}_sum{{{rendered}}} {scrape * 7.5}")
            lines.append(f"{name}_count{{{rendered}}} {scrape * len(HISTOGRAM_BOUNDS)}")
    return "\n".join(lines) + "\n"


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def evaluate_on_prometheus(prometheus, found, check):
    """Serves synthetic series, lets a real Prometheus scrape them, and runs every expression on it."""
    scrapes = [0]

    class Exporter(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            scrapes[0] += 1
            body = synthetic_exposition(scrapes[0]).encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format, *args):
            pass

    exporter = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Exporter)
    threading.Thread(target=exporter.serve_forever, daemon=True).start()
    with tempfile.TemporaryDirectory() as tmp:
        config = os.path.join(tmp, "prometheus.yml")
        with open(config, "w", encoding="utf-8") as file:
            json.dump(
                {
                    "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                    "scrape_configs": [
                        {"job_name": "ccluster", "static_configs": [{"targets": [f"127.0.0.1:{exporter.server_address[1]}"]}]}
                    ],
                },
                file,
            )
        port = free_port()
        server = subprocess.Popen(
            [
                prometheus,
                f"--config.file={config}",
                f"--storage.tsdb.path={os.path.join(tmp, 'data')}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=open(os.path.join(tmp, "prometheus.log"), "w"),
        )
        try:
            base = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 60
            # Enough samples for rates over 5 s windows and a 10 s range.
            while scrapes[0] < 12 and time.monotonic() < deadline and server.poll() is None:
                time.sleep(0.5)
            check("Prometheus scraped the synthetic series", scrapes[0] >= 12, open(os.path.join(tmp, "prometheus.log")).read()[-2000:])
            for where, expr in found:
                call = label_values_call(expr)
                if call:
                    query = f"group by ({call[1]}) ({call[0]})"
                else:
                    query = expr
                    for variable, value in SHORT_VARIABLES.items():
                        query = query.replace(variable, value)
                url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": query})
                try:
                    with urllib.request.urlopen(url, timeout=10) as reply:
                        answer = json.load(reply)
                except Exception as error:  # an HTTP 400 carries the parse error
                    answer = {"status": "error", "error": str(error)}
                result = answer.get("data", {}).get("result", [])
                check(f"{where}: Prometheus returns samples", answer.get("status") == "success" and len(result) > 0, f"{answer} for {query}")
        finally:
            server.terminate()
            try:
                server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
            exporter.shutdown()


def expressions(dashboard):
    """(where, expr) for every PromQL expression in the dashboard: panel targets, also inside rows, and variables."""
    found = []

    def walk(panels):
        for panel in panels:
            for target in panel.get("targets", []):
                found.append((f"panel {panel.get('title')!r} {target.get('refId')}", target["expr"]))
            walk(panel.get("panels", []))

    walk(dashboard.get("panels", []))
    for variable in dashboard.get("templating", {}).get("list", []):
        query = variable.get("query")
        if isinstance(query, dict):
            query = query.get("query")
        if variable.get("type") == "query" and query:
            found.append((f"variable {variable['name']}", query))
    return found


def label_values_call(expr):
    match = re.fullmatch(r"\s*label_values\(\s*([a-zA-Z_:][a-zA-Z0-9_:]*)\s*,\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*\)\s*", expr)
    return match.groups() if match else None


def names_and_labels(expr):
    """The series names and the label names an expression uses (in matchers and by/without clauses)."""
    without_strings = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    # Series names are what is left once label matchers and groupings are taken out.
    bare = re.sub(r"\{[^}]*\}", "", without_strings)
    bare = re.sub(r"\b(?:by|without)\s*\([^)]*\)", "", bare)
    names = set(re.findall(r"\b[a-zA-Z_:][a-zA-Z0-9_:]*\b(?=\s*(?:\{|\[|\)|$|\s*[-+*/]))", bare))
    names -= {"by", "without", "sum", "rate", "increase", "histogram_quantile", "topk", "bottomk"}
    names = {name for name in names if not re.fullmatch(r"[0-9.]+", name)}
    labels = set()
    for matchers in re.findall(r"\{([^}]*)\}", without_strings):
        labels.update(re.findall(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)", matchers))
    for grouping in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", without_strings):
        labels.update(label.strip() for label in grouping.split(",") if label.strip())
    return names, labels


def main():
    promtool = prometheus = None
    if "--promtool" in sys.argv:
        promtool = sys.argv[sys.argv.index("--promtool") + 1]
    if "--prometheus" in sys.argv:
        prometheus = sys.argv[sys.argv.index("--prometheus") + 1]
    passed, failed = 0, 0

    def check(what, ok, detail=""):
        nonlocal passed, failed
        if ok:
            passed += 1
        else:
            failed += 1
            print(f"FAILED: {what} {detail}", file=sys.stderr)

    args = [
        arg
        for i, arg in enumerate(sys.argv[1:], 1)
        if not arg.startswith("--") and sys.argv[i - 1] not in ("--promtool", "--prometheus")
    ]
    with open(args[0] if args else DASHBOARD, encoding="utf-8") as file:
        dashboard = json.load(file)
    check("schemaVersion 39", dashboard.get("schemaVersion") == 39, dashboard.get("schemaVersion"))
    check(
        "DS_PROMETHEUS input",
        any(i.get("name") == "DS_PROMETHEUS" and i.get("pluginId") == "prometheus" for i in dashboard.get("__inputs", [])),
    )
    variables = {v["name"]: v for v in dashboard.get("templating", {}).get("list", [])}
    workflow = variables.get("workflow", {})
    query = workflow.get("query", {})
    query = query.get("query") if isinstance(query, dict) else query
    check(
        "workflow variable from label_values(ccluster_tasks_started_total, ccluster_workflow)",
        label_values_call(query or "") == ("ccluster_tasks_started_total", "ccluster_workflow"),
        query,
    )

    uids = set()

    def datasources(panels):
        for panel in panels:
            uids.add(json.dumps(panel.get("datasource")))
            for target in panel.get("targets", []):
                uids.add(json.dumps(target.get("datasource")))
            datasources(panel.get("panels", []))

    datasources([p for p in dashboard["panels"] if p.get("type") != "row"])
    check("every panel and target uses ${DS_PROMETHEUS}", uids == {json.dumps({"type": "prometheus", "uid": "${DS_PROMETHEUS}"})}, uids)

    found = expressions(dashboard)
    check("the dashboard has expressions", len(found) > 10, len(found))
    used = set()
    for where, expr in found:
        call = label_values_call(expr)
        names, labels = ({call[0]}, {call[1]}) if call else names_and_labels(expr)
        used |= names
        unknown = names - SERIES.keys()
        check(f"{where}: known series", names and not unknown, f"{sorted(unknown)} in {expr}")
        allowed = set().union(*(SERIES.get(name, set()) for name in names))
        check(f"{where}: labels of its series", labels <= allowed, f"{sorted(labels - allowed)} in {expr}")
    missing = {name for name in COUNTERS_AND_GAUGES if name not in used} | {
        name for name in HISTOGRAMS if not any(u.startswith(name) for u in used)
    }
    check("every series is shown somewhere", not missing, sorted(missing))

    if promtool:
        rules = {"groups": [{"name": "dashboard", "rules": []}]}
        for index, (where, expr) in enumerate(found):
            if label_values_call(expr):
                continue
            for variable, value in VARIABLES.items():
                expr = expr.replace(variable, value)
            rules["groups"][0]["rules"].append({"record": f"dashboard:expr_{index}", "expr": expr})
        with tempfile.NamedTemporaryFile("w", suffix=".yml", delete=False) as file:
            json.dump(rules, file)  # JSON is YAML
        try:
            result = subprocess.run([promtool, "check", "rules", file.name], capture_output=True, text=True)
        finally:
            os.unlink(file.name)
        check("promtool parses every expression", result.returncode == 0, result.stdout + result.stderr)

    if prometheus:
        evaluate_on_prometheus(prometheus, found, check)

    print(f"{passed} passed, {failed} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
