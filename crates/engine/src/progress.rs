//! Progress reporting: the engine calls a [`Progress`] implementation; the
//! command line draws bars, tests and libraries pass [`NoProgress`].

/// Receives progress callbacks from planning and execution. Called from
/// worker threads, hence `Sync`. Every method has an empty default.
pub trait Progress: Sync {
    /// A phase begins (`"statistics"`, `"merging"`), with its totals: bytes of
    /// input to read and tensors to produce.
    fn start(&self, _phase: &str, _total_bytes: u64, _total_tensors: u64) {}
    /// Work was done in the current phase.
    fn advance(&self, _bytes: u64, _tensors: u64) {}
    /// The current phase is over.
    fn finish(&self) {}
    /// Something worth telling the user (the plan's seed, files copied).
    fn message(&self, _text: &str) {}
    /// Something the user should look at (a trimming method trims nothing, a
    /// parameter was ignored).
    fn warning(&self, _text: &str) {}
}

/// Ignores all progress.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoProgress;

impl Progress for NoProgress {}
