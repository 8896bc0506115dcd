#!/usr/bin/env python3
"""Checks tests/otlp/receiver.py end to end: starts it, sends one request of each signal over
OTLP/gRPC (the generated stubs), OTLP/HTTP protobuf and OTLP/HTTP JSON (urllib), reads back what it
recorded, and stops it with SIGTERM. Run it with the Python that scripts/otlp-receiver-for-tests.sh
prints:

    eval "$(scripts/otlp-receiver-for-tests.sh)" && "$PYTHON" tests/otlp/selfcheck.py

Exits 0 and prints "N passed, 0 failed" when everything holds, 1 otherwise.
"""

import gzip
import http.client
import json
import os
import signal
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request

import grpc
from google.protobuf import json_format
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2, logs_service_pb2_grpc
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.logs.v1 import logs_pb2
from opentelemetry.proto.metrics.v1 import metrics_pb2
from opentelemetry.proto.resource.v1 import resource_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

RECEIVER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "receiver.py")
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_SPAN_ID = "00f067aa0ba902b7"


def resource(name):
    return resource_pb2.Resource(
        attributes=[common_pb2.KeyValue(key="service.name", value=common_pb2.AnyValue(string_value=name))]
    )


def trace_request(span_id_hex, name):
    span = trace_pb2.Span(
        trace_id=bytes.fromhex(TRACE_ID),
        span_id=bytes.fromhex(span_id_hex),
        parent_span_id=bytes.fromhex(PARENT_SPAN_ID),
        name=name,
        kind=trace_pb2.Span.SPAN_KIND_INTERNAL,
        start_time_unix_nano=1_700_000_000_000_000_000,
        end_time_unix_nano=1_700_000_001_000_000_000,
    )
    return trace_service_pb2.ExportTraceServiceRequest(
        resource_spans=[
            trace_pb2.ResourceSpans(
                resource=resource("selfcheck"), scope_spans=[trace_pb2.ScopeSpans(spans=[span])]
            )
        ]
    )


def metrics_request():
    point = metrics_pb2.NumberDataPoint(as_int=7, time_unix_nano=1_700_000_000_000_000_000)
    metric = metrics_pb2.Metric(
        name="selfcheck.count",
        unit="1",
        sum=metrics_pb2.Sum(
            data_points=[point],
            aggregation_temporality=metrics_pb2.AGGREGATION_TEMPORALITY_CUMULATIVE,
            is_monotonic=True,
        ),
    )
    return metrics_service_pb2.ExportMetricsServiceRequest(
        resource_metrics=[
            metrics_pb2.ResourceMetrics(
                resource=resource("selfcheck"), scope_metrics=[metrics_pb2.ScopeMetrics(metrics=[metric])]
            )
        ]
    )


def logs_request():
    record = logs_pb2.LogRecord(
        body=common_pb2.AnyValue(string_value="hello"),
        trace_id=bytes.fromhex(TRACE_ID),
        span_id=bytes.fromhex(PARENT_SPAN_ID),
    )
    return logs_service_pb2.ExportLogsServiceRequest(
        resource_logs=[
            logs_pb2.ResourceLogs(resource=resource("selfcheck"), scope_logs=[logs_pb2.ScopeLogs(log_records=[record])])
        ]
    )


def post(url, body, content_type, gzipped=False):
    headers = {"Content-Type": content_type}
    if gzipped:
        body = gzip.compress(body)
        headers["Content-Encoding"] = "gzip"
    with urllib.request.urlopen(urllib.request.Request(url, data=body, headers=headers), timeout=10) as reply:
        return reply.status, reply.headers.get("Content-Type"), reply.read()


def main():
    passed, failed = 0, 0

    def check(what, ok, detail=""):
        nonlocal passed, failed
        if ok:
            passed += 1
        else:
            failed += 1
            print(f"FAILED: {what} {detail}", file=sys.stderr)

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "otlp.jsonl")
        receiver = subprocess.Popen(
            [sys.executable, RECEIVER, "--out", out], stdout=subprocess.PIPE, text=True
        )
        try:
            ready = json.loads(receiver.stdout.readline())
            check("ready line names both endpoints", ready["grpc"].startswith("127.0.0.1:") and ready["http"].startswith("http://127.0.0.1:"), ready)

            with grpc.insecure_channel(ready["grpc"]) as channel:
                reply = trace_service_pb2_grpc.TraceServiceStub(channel).Export(
                    trace_request("1111111111111111", "grpc-span"), timeout=10
                )
                check("grpc traces answered with an empty response", reply == trace_service_pb2.ExportTraceServiceResponse())
                metrics_service_pb2_grpc.MetricsServiceStub(channel).Export(metrics_request(), timeout=10)
                logs_service_pb2_grpc.LogsServiceStub(channel).Export(logs_request(), timeout=10)

            status, content_type, body = post(
                ready["http"] + "/v1/traces",
                trace_request("2222222222222222", "http-proto-span").SerializeToString(),
                "application/x-protobuf",
            )
            check("http protobuf traces answered 200 protobuf", status == 200 and content_type == "application/x-protobuf", (status, content_type))
            parsed = trace_service_pb2.ExportTraceServiceResponse()
            parsed.ParseFromString(body)
            check("http protobuf response parses", parsed == trace_service_pb2.ExportTraceServiceResponse())

            post(ready["http"] + "/v1/metrics", metrics_request().SerializeToString(), "application/x-protobuf", gzipped=True)

            # OTLP/JSON: camelCase keys, ids as hex, enums as numbers.
            json_body = json_format.MessageToDict(trace_request("3333333333333333", "http-json-span"))
            span = json_body["resourceSpans"][0]["scopeSpans"][0]["spans"][0]
            span.update(traceId=TRACE_ID, spanId="3333333333333333", parentSpanId=PARENT_SPAN_ID, kind=1)
            status, content_type, body = post(ready["http"] + "/v1/traces", json.dumps(json_body).encode(), "application/json")
            check("http json traces answered 200 json", status == 200 and content_type == "application/json" and json.loads(body) == {}, (status, content_type, body))
            logs_json = json_format.MessageToDict(logs_request())
            logs_json["resourceLogs"][0]["scopeLogs"][0]["logRecords"][0].update(traceId=TRACE_ID, spanId=PARENT_SPAN_ID)
            post(ready["http"] + "/v1/logs", json.dumps(logs_json).encode(), "application/json")

            # A chunked body (no Content-Length), as some HTTP clients send.
            connection = http.client.HTTPConnection(ready["http"].removeprefix("http://"), timeout=10)
            body = trace_request("4444444444444444", "http-chunked-span").SerializeToString()
            connection.request(
                "POST", "/v1/traces", body=iter([body[:10], body[10:]]),
                headers={"Content-Type": "application/x-protobuf"}, encode_chunked=True,
            )
            reply = connection.getresponse()
            reply.read()
            connection.close()
            check("chunked http protobuf answered 200", reply.status == 200, reply.status)

            try:
                post(ready["http"] + "/v1/nothing", b"", "application/x-protobuf")
                check("unknown path is 404", False)
            except urllib.error.HTTPError as error:
                check("unknown path is 404", error.code == 404, error.code)
        finally:
            receiver.send_signal(signal.SIGTERM)
            try:
                code = receiver.wait(timeout=10)
            except subprocess.TimeoutExpired:
                receiver.kill()
                code = receiver.wait()
        check("receiver exits 0 on SIGTERM", code == 0, code)

        lines = [json.loads(line) for line in open(out, encoding="utf-8")]
        seen = [(line["signal"], line["transport"]) for line in lines]
        expected = [
            ("traces", "grpc"), ("metrics", "grpc"), ("logs", "grpc"),
            ("traces", "http"), ("metrics", "http"), ("traces", "http"), ("logs", "http"), ("traces", "http"),
        ]
        check("every request recorded in order", seen == expected, seen)
        spans = [
            span
            for line in lines if line["signal"] == "traces"
            for rs in line["request"]["resource_spans"] for ss in rs["scope_spans"] for span in ss["spans"]
        ]
        check("span names", [s["name"] for s in spans] == ["grpc-span", "http-proto-span", "http-json-span", "http-chunked-span"], spans)
        check("trace ids as hex", all(s["trace_id"] == TRACE_ID for s in spans), spans)
        check("span ids as hex", [s["span_id"] for s in spans] == ["1111111111111111", "2222222222222222", "3333333333333333", "4444444444444444"], spans)
        check("parent span ids as hex", all(s["parent_span_id"] == PARENT_SPAN_ID for s in spans), spans)
        check("preserved proto field names", "start_time_unix_nano" in spans[0], spans[0])
        log = lines[2]["request"]["resource_logs"][0]["scope_logs"][0]["log_records"][0]
        check("log record ids as hex", log["trace_id"] == TRACE_ID and log["span_id"] == PARENT_SPAN_ID, log)
        json_log = lines[6]["request"]["resource_logs"][0]["scope_logs"][0]["log_records"][0]
        check("OTLP/JSON hex ids read as bytes", json_log["trace_id"] == TRACE_ID and json_log["span_id"] == PARENT_SPAN_ID, json_log)
        metric = lines[4]["request"]["resource_metrics"][0]["scope_metrics"][0]["metrics"][0]
        check("gzip metrics decoded", metric["name"] == "selfcheck.count" and metric["sum"]["data_points"][0]["as_int"] == "7", metric)

    print(f"{passed} passed, {failed} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
