//! `wharf demo`: the whole story in one command, without Docker.
use anyhow::Result;
use std::path::PathBuf;

pub fn run(_keep: Option<PathBuf>, _json: bool) -> Result<()> {
    anyhow::bail!("demo: synthetic image generator not wired yet")
}
