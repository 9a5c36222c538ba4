//! Sharded merges: `merge --shard I/N` (one worker's output shards) and
//! `join OUT` (checks the pieces and assembles the model).

use std::fmt;
use std::str::FromStr;

use anyhow::Result;
use tensormerge::engine::EngineError;
use tensormerge::io::{JoinOptions, join};

use crate::cli::JoinArgs;
use crate::printer::Printer;

/// `--shard I/N`: worker `I` (0-based) of `N`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShardArg {
    /// This worker, `0..workers`.
    pub worker: usize,
    /// Number of workers.
    pub workers: usize,
}

impl FromStr for ShardArg {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("`{s}` is not I/N (worker I of N, counted from 0: 0/4 .. 3/4)");
        let (i, n) = s.trim().split_once('/').ok_or_else(bad)?;
        let worker: usize = i.trim().parse().map_err(|_| bad())?;
        let workers: usize = n.trim().parse().map_err(|_| bad())?;
        if workers == 0 {
            return Err(format!("`{s}`: N must be at least 1"));
        }
        if worker >= workers {
            return Err(format!(
                "`{s}`: workers are numbered from 0, so I must be below N (0/{workers} .. {}/{workers})",
                workers - 1
            ));
        }
        Ok(ShardArg { worker, workers })
    }
}

impl fmt::Display for ShardArg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.worker, self.workers)
    }
}

/// `tensormerge join OUT`.
pub fn join_cmd(a: JoinArgs, p: &Printer) -> Result<()> {
    p.info(&format!(
        "checking the pieces in `{}`",
        tensormerge::io::pieces::pieces_dir(&a.output)
            .map_err(|e| EngineError::io("bad output path", e))?
            .display()
    ));
    let report = join(
        &a.output,
        &JoinOptions {
            overwrite: a.overwrite,
            keep_pieces: a.keep_pieces,
        },
    )
    .map_err(|e| EngineError::io(format!("cannot join `{}`", a.output.display()), e))?;
    println!(
        "joined {} shard(s) from {} worker(s) into {}: {} checked",
        report.shards,
        report.workers,
        report.out_dir.display(),
        crate::commands::human(report.bytes)
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_args_parse_and_refuse() {
        assert_eq!(
            "2/7".parse::<ShardArg>(),
            Ok(ShardArg {
                worker: 2,
                workers: 7
            })
        );
        assert_eq!("0/1".parse::<ShardArg>().unwrap().to_string(), "0/1");
        for bad in ["7/7", "1/0", "a/2", "3", "-1/2", "1/2/3"] {
            assert!(bad.parse::<ShardArg>().is_err(), "{bad}");
        }
        assert!("2/2".parse::<ShardArg>().unwrap_err().contains("below N"));
    }
}
