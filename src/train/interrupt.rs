//! A stop request for the training loop: when it is set, the loop finishes the current step,
//! writes a checkpoint and returns (`StopReason::Interrupted`).
//!
//! The flag is a shared `AtomicBool`; the library never touches signals or exits the process.
//! The command-line edge connects it to Ctrl-C, SIGTERM and SIGHUP (`src/cli/mod.rs`,
//! `interrupt_on_signals`: the first signal sets the flag, a second one quits at once, which is
//! safe because checkpoints are written into a temporary directory and renamed into place; see
//! [`crate::train::checkpoint`]); tests set it by hand with [`Interrupt::trigger`].

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// A stop request shared between a signal handler (or a test) and the training loop.
#[derive(Clone, Debug, Default)]
pub struct Interrupt {
    flag: Arc<AtomicBool>,
}

impl Interrupt {
    /// A flag that is not set.
    pub fn new() -> Self {
        Interrupt::default()
    }

    /// Sets the flag (what a signal handler does); returns whether it was already set.
    pub fn trigger(&self) -> bool {
        self.flag.swap(true, Ordering::SeqCst)
    }

    /// Whether a stop was requested.
    pub fn is_triggered(&self) -> bool {
        self.flag.load(Ordering::SeqCst)
    }

    /// Clears the flag.
    pub fn reset(&self) {
        self.flag.store(false, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clones_share_the_flag() {
        let a = Interrupt::new();
        let b = a.clone();
        assert!(!b.is_triggered());
        a.trigger();
        assert!(b.is_triggered());
        b.reset();
        assert!(!a.is_triggered());
        // a fresh flag is independent
        assert!(!Interrupt::new().is_triggered());
    }
}
