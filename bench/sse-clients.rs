//! Benchmark client for `bench/serve.sh`: N Server-Sent Events clients following one run of a
//! `ccluster serve`, and a tail of the run's event log (read every millisecond) that notes when
//! each line was written. Prints, for the events written after every client had connected, the
//! delay from a line being written (the event committed) to its arrival at each client, and from
//! the event's own `time_ms`, as p50/p99/max in milliseconds.
//!
//!   sse-clients BASE_URL RUN EVENTS_FILE CLIENTS GATE_FILE
//!
//! The run is held by its first task until GATE_FILE exists; this program creates it once all
//! clients are connected.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read};
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

fn now_ms() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, base, run, events_file, clients, gate] = &args[..] else {
        eprintln!("usage: sse-clients BASE_URL RUN EVENTS_FILE CLIENTS GATE_FILE");
        std::process::exit(2);
    };
    let clients: usize = clients.parse().expect("CLIENTS");
    // When each line of the log was first seen, by line number (its SSE id).
    let written: Arc<Mutex<HashMap<u64, f64>>> = Arc::default();
    let finished = Arc::new(std::sync::atomic::AtomicBool::new(false));
    {
        let written = written.clone();
        let finished = finished.clone();
        let path = events_file.clone();
        std::thread::spawn(move || {
            let mut offset = 0usize;
            let mut line_no = 0u64;
            let mut bytes = Vec::new();
            while !finished.load(std::sync::atomic::Ordering::Relaxed) {
                if let Ok(mut f) = std::fs::File::open(&path) {
                    bytes.clear();
                    let _ = f.read_to_end(&mut bytes);
                    let seen = now_ms();
                    let mut map = written.lock().unwrap();
                    while let Some(end) = bytes[offset.min(bytes.len())..]
                        .iter()
                        .position(|b| *b == b'\n')
                    {
                        line_no += 1;
                        map.insert(line_no, seen);
                        offset += end + 1;
                    }
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        });
    }
    let connected = Arc::new(Barrier::new(clients + 1));
    let start_after: Arc<Mutex<u64>> = Arc::default();
    let mut handles = Vec::new();
    for _ in 0..clients {
        let url = format!("{base}/api/v1/runs/{run}/events");
        let connected = connected.clone();
        handles.push(std::thread::spawn(move || {
            let agent: ureq::Agent = ureq::Agent::config_builder()
                .timeout_global(Some(Duration::from_secs(600)))
                .build()
                .into();
            let response = agent.get(&url).call().expect("connect");
            connected.wait();
            let reader = BufReader::new(response.into_body().into_reader());
            // (id, arrival, event time_ms)
            let mut got: Vec<(u64, f64, f64)> = Vec::new();
            let mut id = 0u64;
            for line in reader.lines() {
                let Ok(line) = line else { break };
                if let Some(v) = line.strip_prefix("id: ") {
                    id = v.parse().unwrap_or(0);
                } else if let Some(data) = line.strip_prefix("data: ") {
                    let arrival = now_ms();
                    let time_ms = data
                        .split("\"time_ms\":")
                        .nth(1)
                        .and_then(|t| t.trim_end_matches('}').split(',').next())
                        .and_then(|t| t.parse::<f64>().ok())
                        .unwrap_or(f64::NAN);
                    got.push((id, arrival, time_ms));
                    if data.starts_with("{\"event\":\"run_finished\"") {
                        break;
                    }
                }
            }
            got
        }));
    }
    connected.wait();
    // Lines already in the log when every client was there are backlog, not measured.
    std::thread::sleep(Duration::from_millis(200));
    *start_after.lock().unwrap() = written.lock().unwrap().len() as u64;
    std::fs::write(gate, "").expect("gate");
    let results: Vec<Vec<(u64, f64, f64)>> =
        handles.into_iter().map(|h| h.join().unwrap()).collect();
    finished.store(true, std::sync::atomic::Ordering::Relaxed);
    std::thread::sleep(Duration::from_millis(20));
    let written = written.lock().unwrap();
    let skip = *start_after.lock().unwrap();
    let mut since_written = Vec::new();
    let mut since_event = Vec::new();
    for got in &results {
        for (id, arrival, time_ms) in got {
            if *id <= skip {
                continue;
            }
            if let Some(w) = written.get(id) {
                since_written.push((arrival - w).max(0.0));
            }
            if time_ms.is_finite() {
                since_event.push(arrival - time_ms);
            }
        }
    }
    since_written.sort_by(f64::total_cmp);
    since_event.sort_by(f64::total_cmp);
    let events = results.first().map_or(0, |r| r.len());
    println!(
        "clients {clients}  events per client {events}  measured deliveries {}",
        since_written.len()
    );
    println!(
        "delay from the line written:   p50 {:.1} ms  p99 {:.1} ms  max {:.1} ms",
        percentile(&since_written, 0.5),
        percentile(&since_written, 0.99),
        since_written.last().copied().unwrap_or(f64::NAN)
    );
    println!(
        "delay from the event's time:   p50 {:.1} ms  p99 {:.1} ms  max {:.1} ms",
        percentile(&since_event, 0.5),
        percentile(&since_event, 0.99),
        since_event.last().copied().unwrap_or(f64::NAN)
    );
}
