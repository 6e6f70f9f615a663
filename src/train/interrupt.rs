//! Ctrl-C / SIGTERM handling: the first signal asks the training loop to stop cleanly (finish the
//! current step, write a checkpoint, exit 0); a second one quits at once.
//!
//! The flag is a shared `AtomicBool`. [`Interrupt::new`] makes a flag no signal touches (tests
//! trigger it by hand with [`Interrupt::trigger`]); [`Interrupt::from_signals`] returns the
//! process-wide flag connected to SIGINT, SIGTERM and SIGHUP (the `ctrlc` crate's
//! "termination" feature). Quitting on the second signal is safe because checkpoints are
//! written into a temporary directory and renamed into place (see [`crate::train::checkpoint`]).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use crate::error::{Error, Result};

/// A stop request shared between a signal handler (or a test) and the training loop.
#[derive(Clone, Debug, Default)]
pub struct Interrupt {
    flag: Arc<AtomicBool>,
}

/// The process-wide flag, created on the first call to [`Interrupt::from_signals`]
/// (`ctrlc` allows one handler per process).
static PROCESS_INTERRUPT: Mutex<Option<Interrupt>> = Mutex::new(None);

/// Exit status after a second interrupt: 128 + SIGINT, the shell convention.
const EXIT_ON_SECOND_SIGNAL: i32 = 130;

impl Interrupt {
    /// A flag not connected to any signal.
    pub fn new() -> Self {
        Interrupt::default()
    }

    /// The process-wide flag set by Ctrl-C, SIGTERM or SIGHUP. Installs the handler on the first
    /// call; later calls return the same flag. A second signal while the flag is already set
    /// exits the process with status 130.
    pub fn from_signals() -> Result<Self> {
        let mut slot = PROCESS_INTERRUPT
            .lock()
            .map_err(|_| Error::Numerical("the interrupt flag's lock is poisoned".into()))?;
        if let Some(existing) = slot.as_ref() {
            return Ok(existing.clone());
        }
        let interrupt = Interrupt::new();
        let flag = interrupt.flag.clone();
        ctrlc::set_handler(move || {
            if flag.swap(true, Ordering::SeqCst) {
                eprintln!("\nsecond interrupt: quitting now (the last complete checkpoint is kept)");
                std::process::exit(EXIT_ON_SECOND_SIGNAL);
            }
            eprintln!(
                "\ninterrupt: finishing the current step and writing a checkpoint \
                 (interrupt again to quit at once)"
            );
        })
        .map_err(|e| Error::Numerical(format!("cannot install the Ctrl-C/SIGTERM handler: {e}")))?;
        *slot = Some(interrupt.clone());
        Ok(interrupt)
    }

    /// Sets the flag (what the signal handler does).
    pub fn trigger(&self) {
        self.flag.store(true, Ordering::SeqCst);
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
