//! Ring buffer readers: each on a thread of its own, which opens the buffer (a libbpf ring
//! buffer stays on the thread that made it) and polls it for as long as the agent runs.

use std::time::Duration;

/// How long a reader's round waits for a wakeup before it drains what is there anyway.
pub const POLL_WAIT: Duration = Duration::from_millis(200);

/// Starts thread `name`: `open` makes the reader there; `poll` waits (up to [`POLL_WAIT`])
/// for and handles the events of one round. Returns once the reader is open, or why it
/// could not be.
pub fn spawn<R, E1, E2, O, P>(
    name: &str,
    what: &'static str,
    open: O,
    poll: P,
) -> Result<(), String>
where
    E1: std::fmt::Display,
    E2: std::fmt::Display,
    O: FnOnce() -> Result<R, E1> + Send + 'static,
    P: Fn(&R, Duration) -> Result<(), E2> + Send + 'static,
{
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            let reader = match open() {
                Ok(r) => {
                    let _ = tx.send(Ok(()));
                    r
                }
                Err(e) => {
                    let _ = tx.send(Err(e.to_string()));
                    return;
                }
            };
            loop {
                if let Err(e) = poll(&reader, POLL_WAIT) {
                    tracing::warn!(error = %e, "reading {what}");
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
        })
        .map_err(|e| e.to_string())?;
    rx.recv().map_err(|e| e.to_string())?
}

/// One round of a reader of rings the programs wake only when they fill up (a wakeup per
/// record would cost a context switch each): waits for a wakeup or `wait`, then drains
/// whatever is there.
pub fn drain(
    rb: &weir_bpf::RingBuffer<'static>,
    wait: Duration,
) -> Result<(), weir_bpf::LibbpfError> {
    rb.poll(wait)?;
    rb.consume()
}
