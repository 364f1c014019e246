//! The reader of the forwarding summaries: what a drain of the rings holds is decoded into a
//! batch and pushed into the flow log under one lock per batch, not one per summary (at some
//! 100,000 summaries a second, the lock was a tenth of the reader's time).

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use weir_bpf::events::TraceEvent;

use super::FlowLog;

/// Summaries pushed at once at most (the lock is not held longer, nor more memory kept).
const BATCH: usize = 1024;

/// Pushes the summaries in `batch` into `log`, emptying it.
fn flush(batch: &mut Vec<TraceEvent>, log: &Mutex<FlowLog>) {
    if batch.is_empty() {
        return;
    }
    let mut log = log.lock().expect("flow log");
    for ev in batch.drain(..) {
        log.push_trace(ev);
    }
}

/// The forwarding summaries' reader (use it on the thread that opened it).
pub struct SummaryReader {
    rb: weir_bpf::RingBuffer<'static>,
    batch: Rc<RefCell<Vec<TraceEvent>>>,
    log: Arc<Mutex<FlowLog>>,
    /// Summaries received so far.
    received: Rc<Cell<u64>>,
}

impl SummaryReader {
    /// A reader of `dp`'s summary rings into `log`.
    pub fn open(
        dp: &weir_bpf::datapath::Datapath,
        log: Arc<Mutex<FlowLog>>,
    ) -> Result<SummaryReader, weir_bpf::BpfError> {
        let batch = Rc::new(RefCell::new(Vec::with_capacity(BATCH)));
        let received = Rc::new(Cell::new(0));
        let (b, l, r) = (batch.clone(), log.clone(), received.clone());
        let rb = dp.trace_events(move |ev| {
            let mut b = b.borrow_mut();
            b.push(ev);
            r.set(r.get() + 1);
            if b.len() == BATCH {
                flush(&mut b, &l);
            }
        })?;
        Ok(SummaryReader {
            rb,
            batch,
            log,
            received,
        })
    }

    /// One round: waits up to `wait` for a wakeup (none when zero), then takes what the rings
    /// hold into the log.
    pub fn drain(&self, wait: Duration) -> Result<(), weir_bpf::LibbpfError> {
        if !wait.is_zero() {
            self.rb.poll(wait)?;
        }
        self.rb.consume()?;
        flush(&mut self.batch.borrow_mut(), &self.log);
        Ok(())
    }

    /// Summaries received since the reader opened.
    pub fn received(&self) -> u64 {
        self.received.get()
    }
}
