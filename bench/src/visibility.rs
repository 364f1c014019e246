//! `weir-bench visibility [ROUNDS] [SECONDS]`: what full flow visibility costs, and what it
//! holds under load.
//!
//! 0. The flow log's cost per summary; `from_netdev`'s per packet with summaries off and on,
//!    and per packet due a summary (BPF_PROG_TEST_RUN).
//! 1. Connection rate pod to pod on one node through weir's tc programs (client threads,
//!    4 unless `WEIR_BENCH_THREADS`, connect/request/reply/close, SO_LINGER 0) with
//!    visibility off (no forwarding summaries, no kernel drop or TCP health programs) and on
//!    (`CFG_TRACE` set, the `kfree_skb` and TCP tracepoint programs attached and watching the
//!    pods, the agent's readers draining every ring into its flow log, as the agent does).
//!    Two ways: rounds of separate client runs alternating, the order rotating (medians, the
//!    ratio on/off, goal >= 0.95), and interleaved: one client run, visibility turned off and
//!    on in alternating 0.5 s phases.
//! 2. Events per second the agent's reader takes: drop events offered at rising rates
//!    (BPF_PROG_TEST_RUN bursts of a malformed packet into `from_netdev`, paced), what it
//!    received and what the full ring refused (counted in the kernel).
//! 3. A drop flood at 1 Mpps: the drops the datapath counted equal the events received plus
//!    the events counted lost, exactly.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use weir_agent::flows::FlowLog;
use weir_bpf::datapath::{TcProgram, CFG_TRACE};
use weir_dataplane::pods::PodDataplane;

use crate::podpod::{build, records, Topo, SERVER};
use crate::{median, spawn_in, Reap};

/// What the reader threads took in: events by kind, and their CPU time.
#[derive(Default)]
struct Taken {
    traces: AtomicU64,
    drops: AtomicU64,
    kernel_drops: AtomicU64,
    cpu_us: AtomicU64,
    wall_us: AtomicU64,
    /// Run time of the kernel drop and TCP health programs (bpf_stats).
    tracepoint_ns: AtomicU64,
}

impl Taken {
    /// The reader threads' CPU time over their running time (a share of one core).
    fn cpu_share(&self) -> f64 {
        self.cpu_us.load(Ordering::Relaxed) as f64
            / self.wall_us.load(Ordering::Relaxed).max(1) as f64
    }
}

/// The agent's readers until `stop`: the drop ring always; with `full`, also the forwarding
/// summaries (on a thread of their own, as in the agent), and the kernel drop and TCP health
/// programs (loaded, attached and watching the pods' namespaces) with their ring.
struct Readers {
    stop: Arc<AtomicBool>,
    /// With `full`: whether the kernel drop and TCP programs are to be attached.
    want_on: Arc<AtomicBool>,
    /// Whether they are (the thread's answer to `want_on`).
    is_on: Arc<AtomicBool>,
    taken: Arc<Taken>,
    thread: Option<std::thread::JoinHandle<Result<()>>>,
}

impl Readers {
    fn start(pods: &Arc<Mutex<PodDataplane>>, t: &Topo, full: bool) -> Result<Readers> {
        let stop = Arc::new(AtomicBool::new(false));
        let (want_on, is_on) = (
            Arc::new(AtomicBool::new(full)),
            Arc::new(AtomicBool::new(full)),
        );
        let taken = Arc::new(Taken::default());
        let (pods, st, tk) = (pods.clone(), stop.clone(), taken.clone());
        let (wo, io) = (want_on.clone(), is_on.clone());
        let inums = [&t.n, &t.c, &t.s].map(|ns| {
            weir_bpf::kdrop::netns_inum(std::path::Path::new(&format!("/run/netns/{ns}")))
        });
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || -> Result<()> {
            let log = Arc::new(Mutex::new(FlowLog::new("bench")));
            let dp = pods.lock().expect("pods");
            let (l1, k1) = (log.clone(), tk.clone());
            let drops = dp.datapath().drop_events(move |e| {
                l1.lock().expect("log").push_drop_event(e);
                k1.drops.fetch_add(1, Ordering::Relaxed);
            })?;
            drop(dp);
            let parts = parts();
            let inum = |i: usize| -> Result<u32> {
                inums[i]
                    .as_ref()
                    .copied()
                    .map_err(|e| anyhow::anyhow!("{e}"))
            };
            let mut kdrops = None;
            if full && parts.contains("kdrop") {
                // The node's namespace and the pods', as the agent watches them.
                let kd = weir_bpf::kdrop::KernelDrops::load(inum(0)?)?;
                kd.watch(inum(1)?)?;
                kd.watch(inum(2)?)?;
                let (l3, k3) = (log.clone(), tk.clone());
                let krb = kd.events(move |d| {
                    l3.lock().expect("log").push_kernel_drop(&d);
                    k3.kernel_drops.fetch_add(1, Ordering::Relaxed);
                })?;
                kdrops = Some((kd, krb));
            }
            let mut tcp = None;
            if full && parts.contains("tcp") {
                let th = weir_bpf::tcp_health::TcpHealth::load()?;
                th.watch(inum(1)?, 0)?;
                th.watch(inum(2)?, 1)?;
                tcp = Some(th);
            }
            // The summaries on a thread of their own, read as the agent reads them: started
            // last, so that a failure before leaves no thread whose stop nobody gives.
            let traces = (full && parts.contains("trace"))
                .then(|| summaries_thread(&pods, &log, &st, &tk))
                .transpose()?;
            let _ = ready_tx.send(());
            let (cpu0, wall0) = (thread_cpu_us(), Instant::now());
            let mut on = full;
            while !st.load(Ordering::Relaxed) {
                if wo.load(Ordering::Relaxed) != on {
                    on = !on;
                    if let Some((kd, _)) = &mut kdrops {
                        kd.set_attached(on)?;
                    }
                    if let Some(th) = &mut tcp {
                        th.set_attached(on)?;
                    }
                    io.store(on, Ordering::Relaxed);
                }
                drops.poll(Duration::from_millis(20))?;
                drops.consume()?;
                if let Some((_, krb)) = &kdrops {
                    krb.consume()?;
                }
            }
            drops.consume()?;
            if let Some(t) = traces {
                t.join()
                    .map_err(|_| anyhow::anyhow!("the summaries' reader panicked"))??;
            }
            let mut progs = Vec::new();
            if let Some((kd, _)) = &kdrops {
                progs.extend(kd.programs());
            }
            if let Some(th) = &tcp {
                progs.extend(th.programs());
            }
            tk.tracepoint_ns
                .store(progs.iter().map(|p| p.run_time_ns).sum(), Ordering::Relaxed);
            if std::env::var_os("WEIR_BENCH_DEBUG").is_some() {
                for p in &progs {
                    eprintln!("{}: {} runs, {} ns", p.name, p.run_count, p.run_time_ns);
                }
            }
            tk.cpu_us
                .fetch_add(thread_cpu_us() - cpu0, Ordering::Relaxed);
            tk.wall_us
                .store(wall0.elapsed().as_micros() as u64, Ordering::Relaxed);
            Ok(())
        });
        if ready_rx.recv_timeout(Duration::from_secs(30)).is_err() {
            let r = thread.join();
            bail!("the readers did not start: {r:?}");
        }
        Ok(Readers {
            stop,
            want_on,
            is_on,
            taken,
            thread: Some(thread),
        })
    }

    /// Attaches (`on`) or detaches the kernel drop and TCP programs of readers started
    /// `full`, and waits until it is done.
    fn set_on(&mut self, on: bool) -> Result<()> {
        self.want_on.store(on, Ordering::Relaxed);
        let start = Instant::now();
        while self.is_on.load(Ordering::Relaxed) != on {
            if self.thread.as_ref().is_some_and(|t| t.is_finished()) {
                let t = self.thread.take().expect("a thread");
                t.join()
                    .map_err(|_| anyhow::anyhow!("the readers panicked"))??;
                bail!("the readers stopped before turning visibility {on}");
            }
            if start.elapsed() > Duration::from_secs(10) {
                bail!("the readers did not turn visibility {on}");
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(())
    }

    /// Stops the thread (its programs detach) and returns what it took.
    fn finish(mut self) -> Result<Arc<Taken>> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join()
                .map_err(|_| anyhow::anyhow!("the readers panicked"))??;
        }
        Ok(self.taken.clone())
    }
}

impl Drop for Readers {
    /// Stops the thread (on an early return; `finish` stops it otherwise).
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The agent's summary reader on a thread of its own until `stop`, its rounds the agent's
/// (a wait of up to `ring::POLL_WAIT` for a wakeup, then a drain), counting into `taken`.
fn summaries_thread(
    pods: &Arc<Mutex<PodDataplane>>,
    log: &Arc<Mutex<FlowLog>>,
    stop: &Arc<AtomicBool>,
    taken: &Arc<Taken>,
) -> Result<std::thread::JoinHandle<Result<()>>> {
    let (pods, log, stop, tk) = (pods.clone(), log.clone(), stop.clone(), taken.clone());
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let thread = std::thread::spawn(move || -> Result<()> {
        let opened = {
            let dp = pods.lock().expect("pods");
            weir_agent::flows::SummaryReader::open(dp.datapath(), log)
        };
        let reader = match opened {
            Ok(r) => {
                let _ = ready_tx.send(Ok(()));
                r
            }
            Err(e) => {
                let _ = ready_tx.send(Err(e.to_string()));
                return Ok(());
            }
        };
        let cpu0 = thread_cpu_us();
        while !stop.load(Ordering::Relaxed) {
            reader.drain(weir_agent::ring::POLL_WAIT)?;
            tk.traces.store(reader.received(), Ordering::Relaxed);
        }
        reader.drain(Duration::ZERO)?;
        tk.traces.store(reader.received(), Ordering::Relaxed);
        tk.cpu_us
            .fetch_add(thread_cpu_us() - cpu0, Ordering::Relaxed);
        Ok(())
    });
    ready_rx
        .recv()
        .map_err(|_| anyhow::anyhow!("the summaries' reader did not start"))?
        .map_err(|e| anyhow::anyhow!("opening the summaries' reader: {e}"))?;
    Ok(thread)
}

/// CPU time of the calling thread, in microseconds.
fn thread_cpu_us() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_THREAD_CPUTIME_ID)
        .map(|t| t.tv_sec() as u64 * 1_000_000 + t.tv_nsec() as u64 / 1000)
        .unwrap_or(0)
}

/// `kernel.bpf_stats_enabled`: programs' run time is counted while it is 1.
const BPF_STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";

/// Turns `kernel.bpf_stats_enabled` off, and back to what it was when dropped.
struct StatsOff(String);

impl StatsOff {
    fn new() -> StatsOff {
        let before = std::fs::read_to_string(BPF_STATS).unwrap_or_default();
        let _ = std::fs::write(BPF_STATS, "0");
        StatsOff(before)
    }
}

impl Drop for StatsOff {
    fn drop(&mut self) {
        let _ = std::fs::write(BPF_STATS, self.0.trim());
    }
}

/// Run time of the tc programs so far (bpf_stats), in nanoseconds.
fn tc_ns(pods: &Arc<Mutex<PodDataplane>>) -> u64 {
    pods.lock()
        .expect("pods")
        .datapath()
        .programs()
        .iter()
        .map(|p| p.run_time_ns)
        .sum()
}

fn set_trace(pods: &Arc<Mutex<PodDataplane>>, on: bool) -> Result<()> {
    let p = pods.lock().expect("pods");
    let mut cfg = p.datapath().config()?;
    if on {
        cfg.flags |= CFG_TRACE;
    } else {
        cfg.flags &= !CFG_TRACE;
    }
    p.datapath().set_config(&cfg)?;
    Ok(())
}

/// An Ethernet + IPv4 frame whose header length is 16 bytes: `from_netdev` drops it as
/// DROP_INVALID_PACKET, one drop event each.
fn malformed() -> Vec<u8> {
    let mut f = vec![0u8; 14];
    f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    let mut ip = vec![
        0x44, 0, 0, 40, 0, 0, 0x40, 0, 64, 6, 0, 0, 10, 1, 0, 5, 10, 1, 0, 1,
    ];
    ip.resize(40, 0);
    f.extend_from_slice(&ip);
    f
}

/// The DROP_INVALID_PACKET drops the datapath has counted.
fn invalid_drops(pods: &Arc<Mutex<PodDataplane>>) -> Result<u64> {
    Ok(pods
        .lock()
        .expect("pods")
        .datapath()
        .metrics()?
        .iter()
        .filter(|m| m.name == "DROP_INVALID_PACKET")
        .map(|m| m.packets)
        .sum())
}

/// The drop events the full ring refused so far.
fn drops_lost(pods: &Arc<Mutex<PodDataplane>>) -> Result<u64> {
    Ok(pods
        .lock()
        .expect("pods")
        .datapath()
        .drops_lost()?
        .iter()
        .map(|(_, n)| n)
        .sum())
}

/// Offers drops at `rate` per second for `secs` (bursts of BPF_PROG_TEST_RUN repeats, paced
/// every millisecond) in the node's namespace. Returns the drops offered and the rate
/// reached.
fn flood(t: &Topo, pods: &Arc<Mutex<PodDataplane>>, rate: f64, secs: f64) -> Result<(u64, f64)> {
    let frame = malformed();
    // Unpaced (an infinite rate): bursts of 65,536 back to back.
    let per_ms = (rate / 1000.0).clamp(1.0, 65_536.0) as u32;
    crate::in_netns_thread(&t.n, || {
        let p = pods.lock().expect("pods");
        let start = Instant::now();
        let mut sent = 0u64;
        let mut tick = 0u64;
        while start.elapsed().as_secs_f64() < secs {
            p.datapath()
                .test_run_repeat(TcProgram::FromNetdev, &frame, 1, per_ms)?;
            sent += u64::from(per_ms);
            tick += 1;
            let due = Duration::from_millis(tick);
            if let Some(wait) = due
                .checked_sub(start.elapsed())
                .filter(|_| rate.is_finite())
            {
                std::thread::sleep(wait);
            }
        }
        Ok((sent, sent as f64 / start.elapsed().as_secs_f64()))
    })
}

/// An Ethernet + IPv4 + TCP segment with `flags` from 10.1.0.5:40000 to the server pod's
/// port 8080.
fn segment_to_server(flags: u8) -> Vec<u8> {
    let mut f = vec![0u8; 12];
    f.extend_from_slice(&0x0800u16.to_be_bytes());
    let mut ip = vec![0x45, 0, 0, 40, 0, 0, 0x40, 0, 64, 6, 0, 0, 10, 1, 0, 5];
    ip.extend_from_slice(&SERVER.parse::<std::net::Ipv4Addr>().expect("ip").octets());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&40000u16.to_be_bytes());
    f.extend_from_slice(&8080u16.to_be_bytes());
    f.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 1, 0x50, flags, 0xff, 0xff, 0, 0, 0, 0]);
    f
}

/// The average time `from_netdev` takes over a packet of an established flow to a local
/// pod (BPF_PROG_TEST_RUN, 1,000,000 runs), with forwarding summaries `on` or off.
fn per_packet_ns(t: &Topo, pods: &Arc<Mutex<PodDataplane>>, on: bool) -> Result<f64> {
    set_trace(pods, on)?;
    let frame = segment_to_server(0x10);
    let d = crate::in_netns_thread(&t.n, || {
        let p = pods.lock().expect("pods");
        p.datapath()
            .test_run_repeat(TcProgram::FromNetdev, &frame, 1, 1_000_000)
            .map(|(_, d)| d)
            .map_err(anyhow::Error::from)
    })?;
    set_trace(pods, false)?;
    Ok(d.as_nanos() as f64)
}

/// The average time `from_netdev` takes over a packet due a forwarding summary each time
/// (TCP SYN+RST: a new connection on a tuple whose last one ended), the agent's reader
/// draining the summaries; and the summaries it received.
fn per_summary_ns(t: &Topo, pods: &Arc<Mutex<PodDataplane>>) -> Result<(f64, u64)> {
    set_trace(pods, true)?;
    let readers = Readers::start(pods, t, true)?;
    let frame = segment_to_server(0x06);
    // Bursts of 4,096 (72-byte records: under a third of the ring), the reader given time to
    // drain each (the kernel times the runs alone).
    let (burst, bursts) = (4096, 64);
    let d = crate::in_netns_thread(&t.n, || {
        let mut d = Duration::ZERO;
        for _ in 0..bursts {
            let p = pods.lock().expect("pods");
            d += p
                .datapath()
                .test_run_repeat(TcProgram::FromNetdev, &frame, 1, burst)?
                .1;
            drop(p);
            std::thread::sleep(Duration::from_millis(25));
        }
        Ok(d / bursts)
    })?;
    std::thread::sleep(Duration::from_millis(300));
    let taken = readers.finish()?;
    set_trace(pods, false)?;
    Ok((d.as_nanos() as f64, taken.traces.load(Ordering::Relaxed)))
}

/// Connection rates with visibility off and on in alternating phases of `phase` seconds
/// over one continuous client run: `pairs` pairs (after one to warm up), the order within a
/// pair alternating. Both sides of a pair meet the same host: its drift over seconds, larger
/// here than what is measured, falls on both alike. Returns (off, on) per pair.
fn interleaved(
    t: &Topo,
    pods: &Arc<Mutex<PodDataplane>>,
    pairs: usize,
    phase: f64,
    threads: usize,
) -> Result<Vec<(f64, f64)>> {
    use std::io::{BufRead, Write};
    let parts = parts();
    let mut readers = Readers::start(pods, t, true)?;
    let mut child = Reap(crate::spawn_in(
        &t.c,
        None,
        &[
            "__client_live".into(),
            threads.to_string(),
            format!("{SERVER}:8080"),
        ],
    )?);
    let mut stdin = child.0.stdin.take().expect("piped stdin");
    let mut stdout = std::io::BufReader::new(child.0.stdout.take().expect("piped stdout"));
    // The client's connections and failures so far, and when (its clock, ns).
    let mut count = || -> Result<[u64; 3]> {
        writeln!(stdin)?;
        stdin.flush()?;
        let mut line = String::new();
        stdout.read_line(&mut line)?;
        let v: Vec<u64> = line
            .split_whitespace()
            .filter_map(|w| w.parse().ok())
            .collect();
        v.try_into()
            .map_err(|_| anyhow::anyhow!("the client printed {line:?}"))
    };
    let mut set = |on: bool| -> Result<()> {
        set_trace(pods, on && parts.contains("trace"))?;
        readers.set_on(on)
    };
    let mut out = Vec::new();
    let mut failed = [0; 2];
    let mut phases = Vec::new();
    for pair in 0..=pairs {
        let mut r = [0.0; 2];
        for k in 0..2 {
            let on = (k + pair) % 2 == 1;
            set(on)?;
            let m0 = mono_ns()?;
            let [c0, f0, t0] = count()?;
            std::thread::sleep(Duration::from_secs_f64(phase));
            let [c1, f1, t1] = count()?;
            if pair > 0 {
                phases.push(format!("{} {m0} {} {}", u8::from(on), mono_ns()?, c1 - c0));
            }
            r[usize::from(on)] = (c1 - c0) as f64 * 1e9 / (t1 - t0).max(1) as f64;
            failed[usize::from(on)] += f1 - f0;
        }
        if pair > 0 {
            out.push((r[0], r[1]));
        }
    }
    if let Some(path) = std::env::var_os("WEIR_BENCH_PHASES") {
        std::fs::write(path, phases.join("\n"))?;
    }
    drop(stdin);
    let status = child.0.wait()?;
    if !status.success() {
        bail!("the client ended with {status}");
    }
    if failed != [0, 0] {
        eprintln!(
            "({} and {} failed connections with visibility off and on)",
            failed[0], failed[1]
        );
    }
    set(false)?;
    readers.finish()?;
    Ok(out)
}

/// CLOCK_MONOTONIC, in nanoseconds (what `perf record -k CLOCK_MONOTONIC` stamps samples with).
fn mono_ns() -> Result<u64> {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)?;
    Ok(t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
}

/// The agent's cost of one forwarding summary: records as the programs write them pushed
/// into a flow log that knows 100 pods (names, workloads, labels) and their Services.
fn flow_log_ns() -> f64 {
    let mut log = FlowLog::new("bench");
    for i in 0..100u32 {
        let ip = std::net::IpAddr::from([10, 244, 1, i as u8]);
        let pod = format!("ns{}/pod-{i}", i % 5);
        log.pod_names.insert(ip, pod.clone());
        log.pods.insert(
            pod,
            weir_agent::flows::PodMeta {
                workload: format!("app-{}", i % 10),
                labels: [("app".to_string(), format!("app-{}", i % 10))].into(),
            },
        );
        log.services
            .insert((ip, 8080, 6), format!("ns{}/svc-{}", i % 5, i % 10));
    }
    let n = 200_000u32;
    let records: Vec<[u8; 64]> = (0..n)
        .map(|i| weir_bpf::events::TraceEvent {
            ts: 1_000_000_000,
            reason: 0,
            dir: 0,
            ifindex: 3,
            proto: 6,
            src: std::net::SocketAddr::from((
                [10, 244, 1, (i % 100) as u8],
                40000 + (i % 20000) as u16,
            )),
            dst: std::net::SocketAddr::from(([10, 244, 1, ((i + 7) % 100) as u8], 8080)),
            tcp_flags: 0x02,
            tcp_seen: 0x02,
            packets: 1,
            bytes: 60,
            flags: 1,
            orig: None,
            svc_id: 0,
        })
        .map(|e| e.encode4().expect("an IPv4 summary"))
        .collect();
    let start = Instant::now();
    for r in &records {
        log.push_trace_record(r);
    }
    start.elapsed().as_nanos() as f64 / f64::from(n)
}

/// The parts of visibility turned on (`WEIR_BENCH_PARTS`: trace, kdrop, tcp; all by default).
fn parts() -> String {
    std::env::var("WEIR_BENCH_PARTS").unwrap_or_else(|_| "trace,kdrop,tcp".into())
}

/// `WEIR_BENCH_ONLY`: `on` or `off` runs one side only (for profiling it); unset, both.
fn only() -> Result<Option<bool>> {
    match std::env::var("WEIR_BENCH_ONLY").as_deref() {
        Err(_) => Ok(None),
        Ok("on") => Ok(Some(true)),
        Ok("off") => Ok(Some(false)),
        Ok(other) => bail!("WEIR_BENCH_ONLY={other}: on or off"),
    }
}

/// `weir-bench visibility [ROUNDS] [SECONDS]`.
pub fn bench(rounds: usize, secs: f64, threads: usize) -> Result<()> {
    // Run-time statistics cost each program run two clock reads: off while anything is
    // timed (on only for the breakdown), and back to what they were when the bench ends
    // (but for an interrupt: a bench stopped during the breakdown leaves them on).
    let _stats = StatsOff::new();
    let only = only()?;
    let t = build("wvis")?;
    let _server = Reap(spawn_in(&t.s, None, &["__serve".into(), "2".into()])?);
    std::thread::sleep(Duration::from_millis(300));
    let pods = PodDataplane::new(&t.pins.join("tc"), &t.pins)?;
    let recs = records(&t)?;
    let pods = Arc::new(Mutex::new(pods));
    crate::in_netns_thread(&t.n, || {
        pods.lock().expect("pods").sync(&recs)?;
        Ok(())
    })?;
    println!(
        "flow log: {:.0} ns per forwarding summary (the agent's reader, 200,000 events, 100 pods)",
        flow_log_ns()
    );
    if std::env::var_os("WEIR_BENCH_FLOWLOG_ONLY").is_some() {
        return Ok(());
    }
    let interleaved_only = std::env::var_os("WEIR_BENCH_INTERLEAVED_ONLY").is_some();
    if only.is_none() && !interleaved_only {
        packet_costs(&t, &pods)?;
    }
    if std::env::var_os("WEIR_BENCH_PACKET_ONLY").is_some() {
        return Ok(());
    }
    if !interleaved_only {
        separate_rounds(&t, &pods, rounds, secs, threads, only)?;
    }
    if only.is_some() {
        return Ok(());
    }
    report_interleaved(&t, &pods, rounds, secs, threads)?;
    if interleaved_only {
        return Ok(());
    }
    reader_capacity(&t, &pods)?;
    let unaccounted = floods(&t, &pods, secs.max(2.0))?;
    if unaccounted > 0 {
        bail!("{unaccounted} drops unaccounted for");
    }
    Ok(())
}

/// `from_netdev`'s time per packet of an established flow with summaries off and on, and
/// per packet due a summary.
fn packet_costs(t: &Topo, pods: &Arc<Mutex<PodDataplane>>) -> Result<()> {
    let mut pp: [Vec<f64>; 2] = [vec![], vec![]];
    for _ in 0..5 {
        for on in [false, true] {
            pp[usize::from(on)].push(per_packet_ns(t, pods, on)?);
        }
    }
    println!(
        "per packet (from_netdev, an established flow to a local pod, BPF_PROG_TEST_RUN x 1,000,000, median of 5): {:.0} ns without summaries, {:.0} ns with",
        median(&mut pp[0]),
        median(&mut pp[1])
    );
    let mut ps = Vec::new();
    let mut got = 0;
    for _ in 0..5 {
        let (ns, n) = per_summary_ns(t, pods)?;
        ps.push(ns);
        got = n;
    }
    println!(
        "per packet due a summary (from_netdev, TCP SYN+RST, 64 bursts of 4,096, the reader draining, median of 5): {:.0} ns ({got} summaries received in the last run)",
        median(&mut ps)
    );
    let walked: Vec<String> = pods
        .lock()
        .expect("pods")
        .datapath()
        .programs()
        .iter()
        .map(|p| format!("{} {}", p.name, p.verified_insns))
        .collect();
    println!(
        "instructions the verifier walked (of 1,000,000): {}",
        walked.join(", ")
    );
    Ok(())
}

/// What one round's run gave: its rate, and (visibility on) events per second and the
/// reader's share of a core, or (the breakdown) the programs' time per connection.
struct Run {
    rate: f64,
    events_per_s: f64,
    cpu_share: f64,
    /// tc programs, and kernel drop and TCP programs, ns per connection (bpf_stats).
    bpf_ns: (f64, f64),
}

/// One client run of `secs` with visibility `on`.
fn one_run(
    t: &Topo,
    pods: &Arc<Mutex<PodDataplane>>,
    on: bool,
    secs: f64,
    threads: usize,
) -> Result<Run> {
    set_trace(pods, on && parts().contains("trace"))?;
    let readers = Readers::start(pods, t, on)?;
    let tc0 = tc_ns(pods);
    let (rate, errors) = crate::policy::run_client(&t.c, threads, secs)?;
    let tc = tc_ns(pods) - tc0;
    let taken = readers.finish()?;
    if errors > 0 {
        eprintln!("({errors} failed connections with visibility {on})");
    }
    let get = |n: &AtomicU64| n.load(Ordering::Relaxed);
    if std::env::var_os("WEIR_BENCH_DEBUG").is_some() {
        let lost = pods.lock().expect("pods").datapath().traces_lost()?;
        eprintln!(
            "on={on} rate={rate:.0} traces={} kdrops={} drops={} traces_lost={lost:?}",
            get(&taken.traces),
            get(&taken.kernel_drops),
            get(&taken.drops)
        );
    }
    let conns = (rate * secs).max(1.0);
    Ok(Run {
        rate,
        events_per_s: (get(&taken.traces) + get(&taken.kernel_drops)) as f64 / secs,
        cpu_share: taken.cpu_share(),
        bpf_ns: (tc as f64 / conns, get(&taken.tracepoint_ns) as f64 / conns),
    })
}

/// Rounds of separate client runs, off and on (the order rotating; `only`: one side), and
/// a last pair with bpf_stats on for the programs' time per connection.
fn separate_rounds(
    t: &Topo,
    pods: &Arc<Mutex<PodDataplane>>,
    rounds: usize,
    secs: f64,
    threads: usize,
    only: Option<bool>,
) -> Result<()> {
    println!("# weir-bench visibility: client pod -> server pod {SERVER}:8080 on one node through from_pod (bpf_redirect_peer); {threads} client threads, new connections (SO_LINGER 0); {rounds} rounds of {secs} s, order rotating, medians");
    println!("# off: policy verdicts and drops only; on: forwarding summaries (CFG_TRACE), kfree_skb and TCP tracepoint programs watching the pods, the agent's readers feeding its flow log");
    let mut runs: [Vec<Run>; 2] = [vec![], vec![]];
    let mut breakdown: [Vec<(f64, f64)>; 2] = [vec![], vec![]];
    let mut ratios = Vec::new();
    // Round 0 warms up; rounds 1..=ROUNDS measure; a last pair of runs counts the programs'
    // run time (bpf_stats, which costs time itself, so apart from the rates).
    for round in 0..=rounds + 1 {
        let last = round == rounds + 1;
        if last {
            let _ = std::fs::write(BPF_STATS, "1");
        }
        let mut this = [0.0; 2];
        for k in 0..2 {
            let on = only.unwrap_or((k + round) % 2 == 1);
            let run = one_run(t, pods, on, secs, threads)?;
            this[usize::from(on)] = run.rate;
            if last {
                breakdown[usize::from(on)].push(run.bpf_ns);
            } else if round > 0 {
                runs[usize::from(on)].push(run);
            }
        }
        if round > 0 && !last && only.is_none() {
            ratios.push(this[1] / this[0]);
        }
    }
    set_trace(pods, false)?;
    let _ = std::fs::write(BPF_STATS, "0");
    let of = |k: usize, f: fn(&Run) -> f64| median(&mut runs[k].iter().map(f).collect::<Vec<_>>());
    let (off, on) = (of(0, |r| r.rate), of(1, |r| r.rate));
    let (events, share) = (of(1, |r| r.events_per_s), of(1, |r| r.cpu_share));
    println!("visibility off: {off:.0} connections/s");
    println!(
        "visibility on:  {on:.0} connections/s ({events:.0} events/s into the flow log, reader threads {:.1}% of a core)",
        100.0 * share
    );
    if only.is_some() {
        return Ok(());
    }
    println!(
        "ratio on/off: {:.3} (median of per-round ratios {:.3}, quartiles {:.3}-{:.3} over {} rounds; goal >= 0.95)",
        on / off,
        median(&mut ratios),
        crate::percentile(&mut ratios, 0.25),
        crate::percentile(&mut ratios, 0.75),
        ratios.len()
    );
    let bd = |k: usize, f: fn(&(f64, f64)) -> f64| {
        median(&mut breakdown[k].iter().map(f).collect::<Vec<_>>())
    };
    println!(
        "BPF time per connection (bpf_stats): tc programs {:.0} ns off, {:.0} ns on; kfree_skb and TCP tracepoint programs {:.0} ns",
        bd(0, |p| p.0),
        bd(1, |p| p.0),
        bd(1, |p| p.1)
    );
    Ok(())
}

/// The on/off comparison in alternating phases of one client run, as long in all as the
/// rounds.
fn report_interleaved(
    t: &Topo,
    pods: &Arc<Mutex<PodDataplane>>,
    rounds: usize,
    secs: f64,
    threads: usize,
) -> Result<()> {
    let phase = 0.5;
    let pairs = ((rounds as f64 * secs / phase).round() as usize).max(4);
    let pr = interleaved(t, pods, pairs, phase, threads)?;
    let (off_sum, on_sum) = pr.iter().fold((0.0, 0.0), |a, p| (a.0 + p.0, a.1 + p.1));
    let mut pair_ratios: Vec<f64> = pr.iter().map(|p| p.1 / p.0).collect();
    println!("# interleaved: one client run, visibility off and on in alternating phases of {phase} s ({pairs} pairs, the order alternating), programs attached and detached in between");
    println!(
        "interleaved ratio on/off: {:.3} ({:.0} vs {:.0} connections/s; median of pair ratios {:.3}, quartiles {:.3}-{:.3}; goal >= 0.95)",
        on_sum / off_sum,
        on_sum / pr.len() as f64,
        off_sum / pr.len() as f64,
        median(&mut pair_ratios),
        crate::percentile(&mut pair_ratios, 0.25),
        crate::percentile(&mut pair_ratios, 0.75)
    );
    Ok(())
}

/// What the reader takes before the ring refuses anything: drop events offered at rising
/// rates for 1 s each.
fn reader_capacity(t: &Topo, pods: &Arc<Mutex<PodDataplane>>) -> Result<()> {
    println!("# drop events offered at rising rates for 1 s each, the agent's reader (flow log) draining");
    for offered in [50_000.0, 100_000.0, 200_000.0, 400_000.0, 800_000.0] {
        let lost0 = drops_lost(pods)?;
        let readers = Readers::start(pods, t, false)?;
        let (sent, reached) = flood(t, pods, offered, 1.0)?;
        std::thread::sleep(Duration::from_millis(300));
        let taken = readers.finish()?;
        let got = taken.drops.load(Ordering::Relaxed);
        let lost = drops_lost(pods)? - lost0;
        println!(
            "offered {reached:>9.0}/s: received {got:>8}, refused by the full ring {lost:>8} ({:.1}%), reader {:.0}% of a core",
            100.0 * lost as f64 / sent.max(1) as f64,
            100.0 * taken.cpu_share()
        );
    }
    Ok(())
}

/// Floods at 1 Mpps and as fast as one CPU makes them, for `secs` each: every drop must be
/// an event received or an event counted lost. Returns the drops unaccounted for.
fn floods(t: &Topo, pods: &Arc<Mutex<PodDataplane>>, secs: f64) -> Result<u64> {
    let mut unaccounted = 0;
    for rate in [1_000_000.0, f64::INFINITY] {
        let (drops0, lost0) = (invalid_drops(pods)?, drops_lost(pods)?);
        let readers = Readers::start(pods, t, false)?;
        let (sent, reached) = flood(t, pods, rate, secs)?;
        std::thread::sleep(Duration::from_millis(500));
        let taken = readers.finish()?;
        let counted = invalid_drops(pods)? - drops0;
        let lost = drops_lost(pods)? - lost0;
        let got = taken.drops.load(Ordering::Relaxed);
        let exact = got + lost == counted && counted == sent;
        println!(
            "drop flood {reached:.0} pps for {secs} s: {sent} offered, {counted} counted by the datapath, {got} events received + {lost} counted lost = {} ({})",
            got + lost,
            if exact { "exact: none unreported" } else { "MISMATCH" }
        );
        unaccounted += counted.abs_diff(got + lost);
    }
    Ok(unaccounted)
}
