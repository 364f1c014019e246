//! The reader of the forwarding summaries: what a drain of the rings holds is copied as the
//! programs wrote it into a batch and pushed into the flow log under one lock per batch, not
//! one per summary (at some 100,000 summaries a second, the lock was a tenth of the reader's
//! time). The records are kept as they are (64 bytes for an IPv4 flow's) and decoded where
//! they are counted, not moved about decoded (about 180 bytes each).

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::FlowLog;

/// Summaries pushed at once at most (the lock is not held longer, nor more memory kept).
const BATCH: usize = 1024;

/// Summaries as the programs wrote them, one after the other, each after its length (a
/// byte: 64 or 120).
struct Batch {
    bytes: Vec<u8>,
    count: usize,
}

impl Batch {
    fn push(&mut self, record: &[u8]) {
        let Ok(len) = u8::try_from(record.len()) else {
            return; // no summary is that long
        };
        self.bytes.push(len);
        self.bytes.extend_from_slice(record);
        self.count += 1;
    }

    /// Pushes the summaries into `log`, emptying the batch.
    fn flush(&mut self, log: &Mutex<FlowLog>) {
        if self.count == 0 {
            return;
        }
        let mut log = log.lock().expect("flow log");
        let mut rest = &self.bytes[..];
        while let Some((&len, tail)) = rest.split_first() {
            let (record, tail) = tail.split_at(usize::from(len));
            log.push_trace_record(record);
            rest = tail;
        }
        self.bytes.clear();
        self.count = 0;
    }
}

/// The forwarding summaries' reader (use it on the thread that opened it).
pub struct SummaryReader {
    rb: weir_bpf::RingBuffer<'static>,
    batch: Rc<RefCell<Batch>>,
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
        let batch = Rc::new(RefCell::new(Batch {
            bytes: Vec::with_capacity(BATCH * 65),
            count: 0,
        }));
        let received = Rc::new(Cell::new(0));
        let (b, l, r) = (batch.clone(), log.clone(), received.clone());
        let rb = dp.trace_records(move |record| {
            let mut b = b.borrow_mut();
            b.push(record);
            r.set(r.get() + 1);
            if b.count == BATCH {
                b.flush(&l);
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
        self.batch.borrow_mut().flush(&self.log);
        Ok(())
    }

    /// Summaries received since the reader opened.
    pub fn received(&self) -> u64 {
        self.received.get()
    }
}
