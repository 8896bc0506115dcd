#!/usr/bin/env python3
"""Summarizes what tests/otlp/receiver.py recorded (its --out file), for people reading an experiment:

    python3 tests/otlp/summarize.py otlp.jsonl [--values]

Prints the requests per signal and transport, the resource attributes, each metric (type, unit,
attribute keys, and with --values its data points), each log record (event name and attributes)
and each span (name, ids, parent, attributes). Needs only the standard library.
"""

import json
import sys
from collections import Counter


def any_value(value):
    """The Python value of an OTLP AnyValue as MessageToDict renders it."""
    if not value:
        return None
    (kind, inner), = value.items()
    if kind == "array_value":
        return [any_value(item) for item in inner.get("values", [])]
    if kind == "kvlist_value":
        return {kv["key"]: any_value(kv.get("value")) for kv in inner.get("values", [])}
    return inner


def attributes(items):
    return {kv["key"]: any_value(kv.get("value")) for kv in items or []}


def main():
    args = [arg for arg in sys.argv[1:] if not arg.startswith("--")]
    show_values = "--values" in sys.argv
    lines = [json.loads(line) for line in open(args[0], encoding="utf-8") if line.strip()]

    print("requests:", dict(Counter(f"{l['signal']}/{l['transport']}" for l in lines)))
    resources = {}  # resource attributes (as JSON) -> the signals that carried them
    metrics, logs, spans = {}, [], []
    for line in lines:
        request = line["request"]
        for rm in request.get("resource_metrics", []):
            resources.setdefault(json.dumps(attributes(rm.get("resource", {}).get("attributes")), sort_keys=True), set()).add("metrics")
            for sm in rm.get("scope_metrics", []):
                for metric in sm.get("metrics", []):
                    kind = next(k for k in ("sum", "gauge", "histogram", "exponential_histogram", "summary") if k in metric)
                    entry = metrics.setdefault(
                        metric["name"],
                        {
                            "type": kind,
                            "unit": metric.get("unit", ""),
                            "description": metric.get("description", ""),
                            "scope": sm.get("scope", {}).get("name"),
                            "temporality": metric[kind].get("aggregation_temporality"),
                            "attribute_keys": set(),
                            "points": [],
                        },
                    )
                    for point in metric[kind].get("data_points", []):
                        attrs = attributes(point.get("attributes"))
                        entry["attribute_keys"].update(attrs)
                        value = point.get("as_double", point.get("as_int", point.get("count")))
                        entry["points"].append((value, attrs))
        for rl in request.get("resource_logs", []):
            resources.setdefault(json.dumps(attributes(rl.get("resource", {}).get("attributes")), sort_keys=True), set()).add("logs")
            for sl in rl.get("scope_logs", []):
                for record in sl.get("log_records", []):
                    logs.append((record, sl.get("scope", {}).get("name")))
        for rs in request.get("resource_spans", []):
            resources.setdefault(json.dumps(attributes(rs.get("resource", {}).get("attributes")), sort_keys=True), set()).add("traces")
            for ss in rs.get("scope_spans", []):
                for span in ss.get("spans", []):
                    spans.append((span, ss.get("scope", {}).get("name")))

    print("\nresource attributes:")
    for resource, signal_names in resources.items():
        print(f"  ({', '.join(sorted(signal_names))}) {resource}")

    print(f"\nmetrics ({len(metrics)}):")
    for name, entry in sorted(metrics.items()):
        print(
            f"  {name}  {entry['type']}  unit={entry['unit']!r}  temporality={entry['temporality']}"
            f"  scope={entry['scope']}  attributes={sorted(entry['attribute_keys'])}  points={len(entry['points'])}"
        )
        print(f"      {entry['description']}")
        if show_values:
            for value, attrs in entry["points"]:
                print(f"      {value}  {json.dumps(attrs, sort_keys=True)}")

    print(f"\nlog records ({len(logs)}):")
    for record, scope in logs:
        attrs = attributes(record.get("attributes"))
        name = record.get("event_name") or attrs.get("event.name")
        print(f"  {name}  body={any_value(record.get('body'))!r}  scope={scope}  trace_id={record.get('trace_id', '')}  span_id={record.get('span_id', '')}")
        print(f"      attributes={sorted(attrs) if not show_values else json.dumps(attrs, sort_keys=True)}")

    print(f"\nspans ({len(spans)}):")
    for span, scope in spans:
        attrs = attributes(span.get("attributes"))
        duration_ms = (int(span.get("end_time_unix_nano", 0)) - int(span.get("start_time_unix_nano", 0))) / 1e6
        print(
            f"  {span['name']}  kind={span.get('kind')}  trace_id={span.get('trace_id')}  span_id={span.get('span_id')}"
            f"  parent={span.get('parent_span_id', '')}  {duration_ms:.0f} ms  status={span.get('status', {})}  scope={scope}"
        )
        print(f"      attributes={sorted(attrs) if not show_values else json.dumps(attrs, sort_keys=True)}")
        for event in span.get("events", []):
            print(f"      event {event.get('name')} {sorted(attributes(event.get('attributes')))}")


if __name__ == "__main__":
    main()
