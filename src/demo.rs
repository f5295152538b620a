//! `bite-sync demo` (being written).

use tokio_util::sync::CancellationToken;

/// Demo failure.
#[derive(Debug, thiserror::Error)]
#[error("demo failed")]
pub struct DemoError;

/// Runs the demo.
pub async fn run(
    _args: &crate::cli::DemoArgs,
    _cancel: CancellationToken,
) -> Result<(), DemoError> {
    Err(DemoError)
}
