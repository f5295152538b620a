//! `bite-sync bench` (being written).

use tokio_util::sync::CancellationToken;

/// Bench failure.
#[derive(Debug, thiserror::Error)]
#[error("bench failed")]
pub struct BenchError;

/// Runs the bench.
pub async fn run(
    _args: &crate::cli::BenchArgs,
    _cancel: CancellationToken,
) -> Result<(), BenchError> {
    Err(BenchError)
}
