//! The scheduler: one thread owns the model and runs every request's rows through one
//! `Batcher`. Between steps it admits waiting requests while the batch has room for all of a
//! request's rows (`max_batch_size`); requests beyond that wait in a bounded queue, and a request
//! that finds the queue full is refused at once. A row whose receiver is gone (the client went
//! away) leaves the batch before the next step.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::sync::mpsc::UnboundedSender;

use crate::infer::{Batcher, Chosen, Row};
use crate::model::{CausalLm, ModelBackend};

/// One request: its rows (OpenAI's `n` choices of each prompt), which start together, and where
/// their tokens go, each with its row's index. The channel closes after the last row's finishing
/// token, or earlier when the engine stops; when the receiver is gone, the rows leave the batch.
pub struct Job {
    pub rows: Vec<Row>,
    pub events: UnboundedSender<(usize, Chosen)>,
}

/// Where a row's tokens go: its job's channel, and its index in the job.
type Sink = (UnboundedSender<(usize, Chosen)>, usize);

/// Why a job was not taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The queue is full.
    Busy,
    /// The engine has stopped (shutting down).
    Stopped,
}

pub struct Engine {
    jobs: Sender<Job>,
    /// Jobs submitted and not yet in the batch (at most `max_queue`).
    queued: Arc<AtomicUsize>,
    max_queue: usize,
    abort: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// How long an idle engine waits for a job before it looks at `abort` again.
const IDLE_POLL: Duration = Duration::from_millis(50);

/// How long an engine with nothing running waits for another job once one has come: a burst of
/// requests (clients that start together) then shares one prefill pass, which costs less than
/// one pass each, and their HTTP handlers get the CPU the passes would take from them.
const GATHER: Duration = Duration::from_millis(5);

impl Engine {
    /// Starts the scheduler thread with `model`: at most `max_batch_size` rows generate at
    /// once, and at most `max_queue` jobs wait for room.
    pub fn start<B: ModelBackend>(
        model: CausalLm<B>,
        max_batch_size: usize,
        max_queue: usize,
    ) -> Self {
        let (jobs, queue) = channel();
        let abort = Arc::new(AtomicBool::new(false));
        let queued = Arc::new(AtomicUsize::new(0));
        let (stop, waiting) = (abort.clone(), queued.clone());
        let thread = std::thread::Builder::new()
            .name("swift-rs-engine".into())
            .spawn(move || schedule(&model, max_batch_size, &queue, &waiting, &stop))
            .expect("the engine thread starts");
        Self {
            jobs,
            queued,
            max_queue,
            abort,
            thread: Some(thread),
        }
    }

    /// Queues `job`, or says why not.
    pub fn submit(&self, job: Job) -> Result<(), Refused> {
        if self.abort.load(Ordering::Relaxed) {
            return Err(Refused::Stopped);
        }
        let max = self.max_queue;
        self.queued
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |q| {
                (q < max).then_some(q + 1)
            })
            .map_err(|_| Refused::Busy)?;
        self.jobs.send(job).map_err(|_| Refused::Stopped)
    }

    /// Whether the scheduler thread still runs (it ends when aborted, or if it fails).
    pub fn is_running(&self) -> bool {
        !self.abort.load(Ordering::Relaxed)
            && self.thread.as_ref().is_some_and(|t| !t.is_finished())
    }

    /// Ends every row and every waiting job now: their channels close without a finishing
    /// token.
    pub fn abort(&self) {
        self.abort.store(true, Ordering::Relaxed);
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.abort();
        if let Some(thread) = self.thread.take() {
            // A panic in the thread has been reported already; nothing is left to do with it.
            let _ = thread.join();
        }
    }
}

/// The scheduler's loop; returns when aborted or when every `Engine` handle is gone.
fn schedule<B: ModelBackend>(
    model: &CausalLm<B>,
    max_batch_size: usize,
    queue: &Receiver<Job>,
    queued: &AtomicUsize,
    abort: &AtomicBool,
) {
    let mut batcher = Batcher::new(model);
    // Where each row's tokens go, by the row's key in the batcher.
    let mut senders: HashMap<usize, Sink> = HashMap::new();
    let mut next_key = 0;
    // A job taken from the queue that waits for room in the batch.
    let mut waiting: Option<Job> = None;
    while !abort.load(Ordering::Relaxed) {
        // One look at the receivers decides both: a receiver may go away at any moment, so
        // the rows cancelled are exactly those left without a sender.
        senders.retain(|_, (s, _)| !s.is_closed());
        batcher.cancel(|key| !senders.contains_key(&key));
        let mut start = Vec::new();
        loop {
            let idle = batcher.is_empty() && start.is_empty();
            let job = match waiting.take() {
                Some(job) => job,
                None if idle || batcher.is_empty() => {
                    match queue.recv_timeout(if idle { IDLE_POLL } else { GATHER }) {
                        Ok(job) => job,
                        Err(RecvTimeoutError::Timeout) => break,
                        Err(RecvTimeoutError::Disconnected) => return,
                    }
                }
                None => match queue.try_recv() {
                    Ok(job) => job,
                    Err(_) => break,
                },
            };
            if !job.events.is_closed()
                && !idle
                && batcher.len() + start.len() + job.rows.len() > max_batch_size
            {
                waiting = Some(job);
                break;
            }
            queued.fetch_sub(1, Ordering::SeqCst);
            if job.events.is_closed() {
                continue;
            }
            for (index, row) in job.rows.into_iter().enumerate() {
                senders.insert(next_key, (job.events.clone(), index));
                start.push((next_key, row));
                next_key += 1;
            }
        }
        let started = batcher.start(start);
        deliver(started, &mut senders);
        let stepped = batcher.step();
        deliver(stepped, &mut senders);
    }
}

/// Sends each token to its row's receiver; a finished row's sender is dropped, so a job's
/// channel closes after its last row's last token. A receiver that is gone is noticed before the
/// next step.
fn deliver(chosen: Vec<Chosen>, senders: &mut HashMap<usize, Sink>) {
    for c in chosen {
        let key = c.key;
        let finished = c.finish.is_some();
        if let Some((sender, index)) = senders.get(&key) {
            // A send fails only when the receiver is gone, which the next step's cancel handles.
            let _ = sender.send((*index, c));
        }
        if finished {
            senders.remove(&key);
        }
    }
}
