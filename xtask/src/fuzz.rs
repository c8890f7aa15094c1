//! Fuzzing (being written).
use anyhow::Result;

pub fn run(_seconds_per_target: u64) -> Result<()> {
    Ok(())
}
