//! Worker processes and what /proc says about them (and about PostgreSQL and this process).

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;

/// Linux reports CPU time in clock ticks of `USER_HZ` (100 on every mainstream platform).
const TICKS_PER_SECOND: f64 = 100.0;
/// The worker's own drain after SIGTERM; the queue is settled by then, so this is only a bound.
const STOP_DEADLINE: Duration = Duration::from_secs(20);

/// How the workers of a run are configured.
pub struct WorkerSpec<'a> {
    pub binary: &'a Path,
    pub database_url: &'a str,
    pub encryption_key: &'a str,
    pub batch_size: u32,
    pub max_in_flight: u32,
    /// `HOOKFLEET_CA_CERTIFICATES`: the receiver's throwaway CA when it speaks HTTPS.
    pub ca_certificates: Option<&'a Path>,
}

/// N running `hookfleet-worker` processes; stopped (SIGTERM, then SIGKILL) when dropped.
pub struct Fleet {
    children: Vec<Child>,
    /// Each worker's `METRICS_ADDR` (a loopback port that was free when the worker started).
    metrics_addrs: Vec<String>,
}

impl Fleet {
    pub fn start(spec: &WorkerSpec<'_>, count: u32, tag: &str) -> anyhow::Result<Fleet> {
        let mut fleet = Fleet { children: Vec::new(), metrics_addrs: Vec::new() };
        for n in 1..=count {
            // A port free now: the worker binds it a moment later (a worker that cannot exits,
            // and `exited` reports it).
            let metrics_addr = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.to_string();
            let mut command = Command::new(spec.binary);
            command
                .env("DATABASE_URL", spec.database_url)
                .env("HOOKFLEET_ENCRYPTION_KEY", spec.encryption_key)
                .env("HOOKFLEET_ALLOW_HTTP", "true")
                .env("HOOKFLEET_ALLOWED_CIDRS", "127.0.0.0/8")
                .env("WORKER_ID", format!("bench-{tag}-{n}"))
                .env("METRICS_ADDR", &metrics_addr)
                .env("BATCH_SIZE", spec.batch_size.to_string())
                .env("HOOKFLEET_MAX_IN_FLIGHT", spec.max_in_flight.to_string())
                .env("HOOKFLEET_SHUTDOWN_GRACE", "5s")
                .env("LOG_LEVEL", "warn")
                .envs(spec.ca_certificates.map(|path| ("HOOKFLEET_CA_CERTIFICATES", path)))
                .env_remove("HOOKFLEET_CONFIG")
                .env_remove("RUST_LOG")
                .stdin(Stdio::null());
            // SAFETY: prctl is async-signal-safe and touches no memory of the parent. It makes the
            // worker get SIGTERM when the bench dies without running destructors (SIGKILL, panic
            // abort), so no worker outlives a benchmark.
            unsafe {
                command.pre_exec(|| {
                    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM as libc::c_ulong);
                    Ok(())
                });
            }
            fleet.children.push(command.spawn().context("start hookfleet-worker")?);
            fleet.metrics_addrs.push(metrics_addr);
        }
        Ok(fleet)
    }

    /// Every worker's `webhook_claim_duration_seconds` histogram, added up (a worker whose
    /// `/metrics` does not answer within 2 s is left out).
    pub async fn claim_histogram(&self) -> ClaimHistogram {
        let mut total = ClaimHistogram::default();
        for addr in &self.metrics_addrs {
            if let Ok(Ok(text)) = tokio::time::timeout(Duration::from_secs(2), scrape(addr)).await {
                total.add(&ClaimHistogram::parse(&text));
            }
        }
        total
    }

    pub fn pids(&self) -> Vec<u32> {
        self.children.iter().map(Child::id).collect()
    }

    /// User + system CPU seconds of all workers so far.
    pub fn cpu_seconds(&self) -> f64 {
        self.pids().into_iter().filter_map(cpu_seconds).sum()
    }

    /// Largest VmHWM and largest VmRSS among the workers, in kB.
    pub fn rss_kb(&self) -> (u64, u64) {
        self.pids().into_iter().fold((0, 0), |(peak, now), pid| {
            (peak.max(status_kb(pid, "VmHWM:").unwrap_or(0)), now.max(status_kb(pid, "VmRSS:").unwrap_or(0)))
        })
    }

    /// Any worker that already exited (it should not: workers run until told to stop).
    pub fn exited(&mut self) -> Option<String> {
        self.children.iter_mut().find_map(|child| match child.try_wait() {
            Ok(Some(status)) => Some(format!("worker {} exited early: {status}", child.id())),
            _ => None,
        })
    }

    /// SIGTERM, wait for the graceful exit, SIGKILL whatever is still running after the deadline.
    pub fn stop(mut self) {
        self.stop_all();
    }

    fn stop_all(&mut self) {
        for child in &self.children {
            signal(child.id(), libc::SIGTERM);
        }
        let deadline = Instant::now() + STOP_DEADLINE;
        for child in &mut self.children {
            loop {
                match child.try_wait() {
                    Ok(Some(_)) | Err(_) => break,
                    Ok(None) if Instant::now() > deadline => {
                        let _ = child.kill();
                        let _ = child.wait();
                        break;
                    }
                    Ok(None) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        }
        self.children.clear();
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        self.stop_all();
    }
}

/// `GET /metrics` over HTTP/1.0 (so the answer is neither chunked nor kept alive).
async fn scrape(addr: &str) -> std::io::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream.write_all(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").await?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await?;
    Ok(String::from_utf8_lossy(&response).into_owned())
}

/// The claim-duration histogram of one or more workers: cumulative bucket counts by upper bound
/// (seconds), the sum of the durations and the number of claims.
#[derive(Clone, Debug, Default)]
pub struct ClaimHistogram {
    pub buckets: Vec<(f64, f64)>,
    pub sum: f64,
    pub count: f64,
}

const CLAIM_METRIC: &str = "webhook_claim_duration_seconds";

impl ClaimHistogram {
    fn parse(text: &str) -> ClaimHistogram {
        let mut histogram = ClaimHistogram::default();
        for line in text.lines() {
            let Some(rest) = line.strip_prefix(CLAIM_METRIC) else { continue };
            let Some((name, value)) = rest.rsplit_once(' ') else { continue };
            let Ok(value) = value.trim().parse::<f64>() else { continue };
            if name == "_sum" {
                histogram.sum = value;
            } else if name == "_count" {
                histogram.count = value;
            } else if let Some(le) = name.strip_prefix("_bucket{le=\"").and_then(|le| le.strip_suffix("\"}")) {
                let bound = if le == "+Inf" { f64::INFINITY } else { le.parse().unwrap_or(f64::INFINITY) };
                histogram.buckets.push((bound, value));
            }
        }
        histogram
    }

    fn add(&mut self, other: &ClaimHistogram) {
        self.combine(other, 1.0);
    }

    /// What happened since `earlier` (an earlier scrape of the same workers).
    pub fn since(&self, earlier: &ClaimHistogram) -> ClaimHistogram {
        let mut delta = self.clone();
        delta.combine(earlier, -1.0);
        delta
    }

    fn combine(&mut self, other: &ClaimHistogram, sign: f64) {
        self.sum += sign * other.sum;
        self.count += sign * other.count;
        for &(bound, count) in &other.buckets {
            match self.buckets.iter_mut().find(|(b, _)| *b == bound) {
                Some((_, mine)) => *mine += sign * count,
                None => self.buckets.push((bound, sign * count)),
            }
        }
        self.buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    }

    /// Mean claim duration, ms.
    pub fn mean_ms(&self) -> Option<f64> {
        (self.count > 0.0).then(|| self.sum / self.count * 1000.0)
    }

    /// The upper bound (ms) of the bucket holding the 99th percentile: p99 is at most this.
    pub fn p99_bound_ms(&self) -> Option<f64> {
        let rank = 0.99 * self.count;
        (self.count > 0.0)
            .then(|| self.buckets.iter().find(|(_, cumulative)| *cumulative >= rank).map(|(bound, _)| bound * 1000.0))
            .flatten()
    }
}

fn signal(pid: u32, signal: libc::c_int) {
    if let Ok(pid) = libc::pid_t::try_from(pid) {
        // SAFETY: plain syscall on a pid we own (our child, not yet reaped).
        unsafe {
            libc::kill(pid, signal);
        }
    }
}

/// Fields of /proc/<pid>/stat after the command name: index 0 is field 3 (state).
fn stat_fields(pid: &str) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    Some(stat.rsplit_once(')')?.1.split_whitespace().map(str::to_owned).collect())
}

fn ticks(fields: &[String], indices: &[usize]) -> Option<f64> {
    indices.iter().map(|&i| fields.get(i)?.parse::<f64>().ok()).sum::<Option<f64>>()
}

/// utime + stime of a live process, seconds.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    // utime and stime are fields 14 and 15.
    Some(ticks(&stat_fields(&pid.to_string())?, &[11, 12])? / TICKS_PER_SECOND)
}

/// CPU seconds of this process (the receiver, the producers and the polling).
pub fn own_cpu_seconds() -> f64 {
    cpu_seconds(std::process::id()).unwrap_or(0.0)
}

/// The whole machine's CPU time so far, in ticks: (busy, total) over every core, from the first
/// line of /proc/stat. Idle and iowait count as not busy.
pub fn machine_ticks() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().next()?.strip_prefix("cpu ")?;
    // user nice system idle iowait irq softirq steal (guest time is already inside user).
    let fields: Vec<u64> = line.split_whitespace().take(8).filter_map(|f| f.parse().ok()).collect();
    let [user, nice, system, idle, iowait, irq, softirq, steal] = fields[..] else { return None };
    let busy = user + nice + system + irq + softirq + steal;
    Some((busy, busy + idle + iowait))
}

/// The parent of a process (for a backend: the postmaster).
pub fn parent(pid: u32) -> Option<u32> {
    stat_fields(&pid.to_string())?.get(1)?.parse().ok()
}

/// CPU seconds of the whole PostgreSQL server: the postmaster itself, every child it has reaped
/// (cutime + cstime) and every live child. Deltas of this over a run are what the server spent.
pub fn server_cpu_seconds(postmaster: u32) -> f64 {
    let own = stat_fields(&postmaster.to_string()).and_then(|f| ticks(&f, &[11, 12, 13, 14])).unwrap_or(0.0);
    let mut children = 0.0;
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(pid) = name.to_str().filter(|n| n.bytes().all(|b| b.is_ascii_digit())) else { continue };
            let Some(fields) = stat_fields(pid) else { continue };
            if fields.get(1).and_then(|ppid| ppid.parse::<u32>().ok()) == Some(postmaster) {
                children += ticks(&fields, &[11, 12]).unwrap_or(0.0);
            }
        }
    }
    (own + children) / TICKS_PER_SECOND
}

fn status_kb(pid: u32, key: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find(|line| line.starts_with(key))?.split_whitespace().nth(1)?.parse().ok()
}
