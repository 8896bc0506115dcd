#!/usr/bin/env python3
"""An OTLP receiver for tests, built on the official protocol definitions (opentelemetry-proto).

It serves OTLP/gRPC (TraceService, MetricsService and LogsService Export) and OTLP/HTTP
(POST /v1/traces, /v1/metrics, /v1/logs with application/x-protobuf or application/json bodies,
optionally gzip-encoded or chunked) on 127.0.0.1, on ports the OS picks. When both listen it prints one JSON
line to stdout:

    {"grpc": "127.0.0.1:PORT", "http": "http://127.0.0.1:PORT"}

and appends every request it receives to --out FILE as one JSON line:

    {"signal": "traces"|"metrics"|"logs", "transport": "grpc"|"http", "request": {...}}

where "request" is the Export*ServiceRequest rendered by json_format.MessageToDict with
preserving_proto_field_name=True, except that trace_id, span_id and parent_span_id are lowercase hex
(see hex_ids). Every request is answered with an empty Export*ServiceResponse, so exporters never
retry. SIGTERM or SIGINT stops it cleanly (exit 0).

Install its dependencies with scripts/otlp-receiver-for-tests.sh, which prints the Python to run it with.
"""

import argparse
import base64
import gzip
import http.server
import json
import signal
import sys
import threading
import zlib
from concurrent import futures

import grpc
from google.protobuf import json_format
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2, logs_service_pb2_grpc
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

# signal name -> (request type, response type); also the path /v1/<signal> of OTLP/HTTP.
SIGNALS = {
    "traces": (trace_service_pb2.ExportTraceServiceRequest, trace_service_pb2.ExportTraceServiceResponse),
    "metrics": (
        metrics_service_pb2.ExportMetricsServiceRequest,
        metrics_service_pb2.ExportMetricsServiceResponse,
    ),
    "logs": (logs_service_pb2.ExportLogsServiceRequest, logs_service_pb2.ExportLogsServiceResponse),
}

# Fields holding W3C trace context ids (spans, span links, log records, exemplars). MessageToDict
# renders bytes as base64; tests compare them with the hex of a `traceparent`, so the receiver
# writes them as lowercase hex instead.
ID_FIELDS = ("trace_id", "span_id", "parent_span_id")
ID_FIELDS_JSON = ("traceId", "spanId", "parentSpanId")


def hex_ids(value):
    """Rewrites, in place and at any depth, the base64 id fields of a MessageToDict dict as lowercase hex."""
    if isinstance(value, dict):
        for key, item in value.items():
            if key in ID_FIELDS and isinstance(item, str):
                value[key] = base64.b64decode(item).hex()
            else:
                hex_ids(item)
    elif isinstance(value, list):
        for item in value:
            hex_ids(item)
    return value


def base64_ids(value):
    """OTLP/JSON carries ids as hex (unlike the protobuf JSON mapping, which wants base64): converts
    them, in place, so json_format.Parse reads the right bytes."""
    if isinstance(value, dict):
        for key, item in value.items():
            if key in ID_FIELDS_JSON + ID_FIELDS and isinstance(item, str):
                try:
                    value[key] = base64.b64encode(bytes.fromhex(item)).decode()
                except ValueError:
                    pass  # not hex: leave it to Parse, which reports it
            else:
                base64_ids(item)
    elif isinstance(value, list):
        for item in value:
            base64_ids(item)
    return value


class Recorder:
    """Appends one JSON line per received request to the output file, flushed at once."""

    def __init__(self, path, count_only=False):
        self._file = open(path, "a", encoding="utf-8")
        self._lock = threading.Lock()
        self._count_only = count_only

    def record(self, signal_name, transport, request):
        if self._count_only:
            # For benchmarks: what arrived, counted, so that the receiver's own work (it shares
            # the machine) stays small beside the exporter's.
            spans = sum(len(ss.spans) for rs in getattr(request, "resource_spans", []) for ss in rs.scope_spans)
            line = json.dumps({"signal": signal_name, "transport": transport, "spans": spans})
        else:
            rendered = hex_ids(json_format.MessageToDict(request, preserving_proto_field_name=True))
            line = json.dumps({"signal": signal_name, "transport": transport, "request": rendered})
        with self._lock:
            self._file.write(line + "\n")
            self._file.flush()

    def close(self):
        with self._lock:
            self._file.close()


def grpc_servicers(recorder):
    class Traces(trace_service_pb2_grpc.TraceServiceServicer):
        def Export(self, request, context):
            recorder.record("traces", "grpc", request)
            return trace_service_pb2.ExportTraceServiceResponse()

    class Metrics(metrics_service_pb2_grpc.MetricsServiceServicer):
        def Export(self, request, context):
            recorder.record("metrics", "grpc", request)
            return metrics_service_pb2.ExportMetricsServiceResponse()

    class Logs(logs_service_pb2_grpc.LogsServiceServicer):
        def Export(self, request, context):
            recorder.record("logs", "grpc", request)
            return logs_service_pb2.ExportLogsServiceResponse()

    return Traces(), Metrics(), Logs()


def http_handler(recorder):
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self):
            signal_name = self.path.split("?", 1)[0].removeprefix("/v1/")
            if self.path.split("?", 1)[0] != f"/v1/{signal_name}" or signal_name not in SIGNALS:
                return self._reply(404, "text/plain", b"unknown OTLP path\n")
            request_type, response_type = SIGNALS[signal_name]
            body = self._read_body()
            if body is None:
                return self._reply(400, "text/plain", b"malformed chunked body\n")
            encoding = (self.headers.get("Content-Encoding") or "").lower()
            try:
                if encoding == "gzip":
                    body = gzip.decompress(body)
                elif encoding == "deflate":
                    body = zlib.decompress(body)
                elif encoding not in ("", "identity"):
                    return self._reply(415, "text/plain", f"unsupported encoding {encoding}\n".encode())
            except (OSError, zlib.error) as error:
                return self._reply(400, "text/plain", f"bad {encoding} body: {error}\n".encode())
            content_type = (self.headers.get("Content-Type") or "").split(";", 1)[0].strip().lower()
            request = request_type()
            try:
                if content_type == "application/x-protobuf":
                    request.ParseFromString(body)
                    response = response_type().SerializeToString()
                elif content_type == "application/json":
                    json_format.ParseDict(
                        base64_ids(json.loads(body)), request, ignore_unknown_fields=True
                    )
                    response = json_format.MessageToJson(response_type()).encode()
                else:
                    return self._reply(415, "text/plain", f"unsupported content type {content_type}\n".encode())
            except Exception as error:  # a malformed body: tell the exporter, as a collector would
                return self._reply(400, "text/plain", f"bad OTLP body: {error}\n".encode())
            recorder.record(signal_name, "http", request)
            self._reply(200, content_type, response)

        def _read_body(self):
            """The request body, by Content-Length or chunked transfer coding (None when malformed)."""
            if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
                chunks = []
                while True:
                    size_line = self.rfile.readline(1024).split(b";", 1)[0].strip()
                    try:
                        size = int(size_line, 16)
                    except ValueError:
                        return None
                    if size == 0:
                        while self.rfile.readline(1024).strip():
                            pass  # trailers
                        return b"".join(chunks)
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline(1024)  # the CRLF after each chunk
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _reply(self, status, content_type, body):
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format, *args):
            pass  # stdout carries only the ready line; requests are in --out

    return Handler


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="file to append one JSON line per request to")
    parser.add_argument(
        "--count-only",
        action="store_true",
        help='write {"signal", "transport", "spans": N} per request instead of the request',
    )
    args = parser.parse_args()

    recorder = Recorder(args.out, count_only=args.count_only)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())

    # Exporters batch; gRPC's default 4 MiB limit on a received message would reject big batches.
    grpc_server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=4),
        options=[("grpc.max_receive_message_length", 64 * 1024 * 1024)],
    )
    traces, metrics, logs = grpc_servicers(recorder)
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(traces, grpc_server)
    metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(metrics, grpc_server)
    logs_service_pb2_grpc.add_LogsServiceServicer_to_server(logs, grpc_server)
    grpc_port = grpc_server.add_insecure_port("127.0.0.1:0")
    if grpc_port == 0:
        sys.exit("error: could not listen for OTLP/gRPC on 127.0.0.1")
    grpc_server.start()

    http_server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http_handler(recorder))
    http_server.daemon_threads = True
    http_thread = threading.Thread(target=http_server.serve_forever, daemon=True)
    http_thread.start()

    ready = {"grpc": f"127.0.0.1:{grpc_port}", "http": f"http://127.0.0.1:{http_server.server_address[1]}"}
    print(json.dumps(ready), flush=True)

    # Wake up now and then, so a signal is acted on even where Event.wait does not return for it.
    while not stop.wait(0.5):
        pass
    http_server.shutdown()
    http_server.server_close()
    grpc_server.stop(grace=1).wait()
    recorder.close()


if __name__ == "__main__":
    main()
