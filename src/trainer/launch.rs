//! `memplan train --nproc-per-node N`: starts this node's ranks as torchrun does and gathers
//! their reports.
//!
//! Each rank is this same executable, run with the same arguments less the launcher's, and
//! with torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR,
//! MASTER_PORT) plus `MEMPLAN_RANK_REPORT_DIR`, where it writes its report as
//! `rank-R.json`. The launcher watches every rank: the first that fails (a non-zero exit, a
//! signal) ends the others at once, so that no rank waits on a dead peer and no process is
//! left behind; its last error line is the job's error, naming the rank. A rank that runs out
//! of memory writes its report first: that is a result, not an error.

use std::ffi::OsString;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

use super::TrainReport;

/// Where and how to start this node's ranks.
#[derive(Clone, Debug)]
pub struct Launch {
    /// One progress bar for the job on stderr, driven by rank 0's steps.
    pub progress: bool,
    pub nproc_per_node: u64,
    pub nnodes: u64,
    pub node_rank: u64,
    pub master_addr: String,
    /// 0: a free port on this machine (single-node jobs only).
    pub master_port: u16,
    /// Seconds a rank waits for its peers (store connection and each collective).
    pub timeout_s: u64,
    /// Print every rank's stderr, prefixed with its rank.
    pub verbose: bool,
    /// The memplan executable the ranks run (None: this one).
    pub exe: Option<PathBuf>,
}

/// What the ranks of this node reported.
pub struct Outcome {
    /// Every local rank's report, in rank order.
    pub reports: Vec<TrainReport>,
}

/// A running rank: its global rank, its process and the tail of its stderr.
struct RankProc {
    rank: u64,
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

/// A rank that failed: its global rank and why.
struct Failure {
    rank: u64,
    why: String,
    /// The rank refused its input (exit 2): the job's error is an input error too.
    input: bool,
}

/// Starts the node's ranks with `args` (the command line less the launcher's flags) and waits
/// for them.
pub fn launch(l: &Launch, args: &[OsString]) -> Result<Outcome> {
    let world = l.nproc_per_node * l.nnodes;
    let port = match l.master_port {
        0 if l.nnodes == 1 => free_port()?,
        0 => {
            return Err(Error::input(
                "--master-port: a multi-node job needs an explicit port that every node uses",
            ))
        }
        p => p,
    };
    let exe = match &l.exe {
        Some(p) => p.clone(),
        None => std::env::current_exe()
            .map_err(|e| Error::runtime(format!("cannot find the memplan executable: {e}")))?,
    };
    let dir = report_dir()?;
    let mut children: Vec<RankProc> = Vec::new();
    let bar = l.progress.then(|| {
        let b = indicatif::ProgressBar::new(0);
        b.set_style(
            indicatif::ProgressStyle::with_template(&format!(
                "{{bar:30}} {{pos}}/{{len}} steps  {world} ranks  {{msg}}"
            ))
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        b
    });
    let spawned = (|| -> Result<()> {
        for local in 0..l.nproc_per_node {
            let rank = l.node_rank * l.nproc_per_node + local;
            let mut cmd = Command::new(&exe);
            cmd.args(args)
                .env("RANK", rank.to_string())
                .env("WORLD_SIZE", world.to_string())
                .env("LOCAL_RANK", local.to_string())
                .env("LOCAL_WORLD_SIZE", l.nproc_per_node.to_string())
                .env("MASTER_ADDR", &l.master_addr)
                .env("MASTER_PORT", port.to_string())
                .env("MEMPLAN_DIST_TIMEOUT", l.timeout_s.to_string())
                .env("MEMPLAN_RANK_REPORT_DIR", &dir)
                .env("MEMPLAN_PROGRESS_LINES", "1")
                // c10d logs every retry and failure with a C++ backtrace; the launcher reports
                // the rank's own error line instead (all of it with --verbose).
                .env(
                    "TORCH_CPP_LOG_LEVEL",
                    if l.verbose { "INFO" } else { "FATAL" },
                )
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped());
            let mut child = cmd
                .spawn()
                .map_err(|e| Error::runtime(format!("cannot start rank {rank}: {e}")))?;
            let lines = Arc::new(Mutex::new(Vec::new()));
            if let Some(err) = child.stderr.take() {
                let (lines, verbose, bar) = (lines.clone(), l.verbose, bar.clone());
                std::thread::spawn(move || {
                    for line in BufReader::new(err).lines().map_while(|l| l.ok()) {
                        if let Some(p) = line.strip_prefix("memplan-progress ") {
                            if let Some(b) = &bar {
                                let f: Vec<&str> = p.split_whitespace().collect();
                                if let [step, steps, loss] = f[..] {
                                    b.set_length(steps.parse().unwrap_or(0));
                                    b.set_position(step.parse().unwrap_or(0));
                                    b.set_message(format!("loss {loss:.6}"));
                                }
                            }
                            continue;
                        }
                        if verbose {
                            eprintln!("[rank {rank}] {line}");
                        }
                        let mut v = lines.lock().unwrap_or_else(|p| p.into_inner());
                        v.push(line);
                        let excess = v.len().saturating_sub(50);
                        v.drain(..excess);
                    }
                });
            }
            children.push(RankProc { rank, child, lines });
        }
        Ok(())
    })();
    let failure = match spawned {
        Err(e) => {
            end_all(&mut children);
            let _ = std::fs::remove_dir_all(&dir);
            return Err(e);
        }
        Ok(()) => watch(&mut children),
    };
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    let reports = read_reports(&dir, &children);
    let _ = std::fs::remove_dir_all(&dir);
    // A rank out of memory is the job's result even when its peers then failed on it.
    let oom = reports.iter().flatten().any(|r| r.oom.is_some());
    if let (Some(f), false) = (failure, oom) {
        let msg = format!("rank {} failed: {}", f.rank, f.why);
        return Err(if f.input {
            Error::input(msg)
        } else {
            Error::runtime(msg)
        });
    }
    let reports: Vec<TrainReport> = reports.into_iter().flatten().collect();
    if reports.is_empty() {
        return Err(Error::runtime("no rank wrote a report"));
    }
    Ok(Outcome { reports })
}

/// Waits for every rank; on the first failure, ends the others. Returns that failure.
fn watch(children: &mut [RankProc]) -> Option<Failure> {
    let mut done = vec![false; children.len()];
    let mut failure = None;
    while done.iter().any(|d| !d) {
        for (i, RankProc { rank, child, lines }) in children.iter_mut().enumerate() {
            if done[i] {
                continue;
            }
            match child.try_wait() {
                Ok(None) => {}
                Ok(Some(status)) => {
                    done[i] = true;
                    if !status.success() && failure.is_none() {
                        // Exit 1 is a rank out of memory: its own error line says it all.
                        let last = last_error(lines);
                        failure = Some(Failure {
                            rank: *rank,
                            why: if status.code() == Some(1) {
                                last
                            } else {
                                describe(status, &last)
                            },
                            input: status.code() == Some(2),
                        });
                    }
                }
                Err(e) => {
                    done[i] = true;
                    failure.get_or_insert(Failure {
                        rank: *rank,
                        why: format!("cannot watch the process: {e}"),
                        input: false,
                    });
                }
            }
        }
        if failure.is_some() {
            // Give the stderr readers a moment, then end whoever is left.
            std::thread::sleep(Duration::from_millis(100));
            end_all(children);
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    failure
}

fn describe(status: std::process::ExitStatus, last: &str) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (_, Some(sig)) => format!("killed by signal {sig}{}", tail(last)),
        (Some(c), _) => format!("exit code {c}{}", tail(last)),
        _ => format!("ended abnormally{}", tail(last)),
    }
}

fn tail(last: &str) -> String {
    if last.is_empty() {
        String::new()
    } else {
        format!(": {last}")
    }
}

/// The last `error:` line a rank printed, or its last line.
fn last_error(lines: &Arc<Mutex<Vec<String>>>) -> String {
    // The reader thread may still be draining the pipe.
    std::thread::sleep(Duration::from_millis(50));
    let v = lines.lock().unwrap_or_else(|p| p.into_inner());
    v.iter()
        .rev()
        .find(|l| l.starts_with("error: "))
        .or_else(|| v.last())
        .map(|l| l.trim_start_matches("error: ").to_string())
        .unwrap_or_default()
}

/// Kills and reaps every rank still running.
fn end_all(children: &mut [RankProc]) {
    for RankProc { child, .. } in children.iter_mut() {
        if matches!(child.try_wait(), Ok(None)) {
            let _ = child.kill();
        }
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    for RankProc { child, .. } in children.iter_mut() {
        while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = child.wait();
    }
}

fn read_reports(dir: &std::path::Path, children: &[RankProc]) -> Vec<Option<TrainReport>> {
    children
        .iter()
        .map(|RankProc { rank, .. }| {
            let text = std::fs::read_to_string(dir.join(format!("rank-{rank}.json"))).ok()?;
            serde_json::from_str(&text).ok()
        })
        .collect()
}

fn report_dir() -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!(
        "memplan-ranks-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    ));
    std::fs::create_dir_all(&dir)
        .map_err(|e| Error::runtime(format!("cannot create {}: {e}", dir.display())))?;
    Ok(dir)
}

/// A port nobody listens on now (the store's server takes it a moment later).
fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")
        .map_err(|e| Error::runtime(format!("cannot find a free port: {e}")))?;
    l.local_addr()
        .map(|a| a.port())
        .map_err(|e| Error::runtime(format!("cannot find a free port: {e}")))
}

/// The report path of this rank when a memplan launcher started it.
pub fn report_path(rank: u64) -> Option<PathBuf> {
    std::env::var_os("MEMPLAN_RANK_REPORT_DIR")
        .map(|d| PathBuf::from(d).join(format!("rank-{rank}.json")))
}
