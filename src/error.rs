//! The library's error type: each variant carries what a user needs to fix the problem
//! (which parameter or file, what was expected, what was found).

use std::path::PathBuf;

/// Errors returned by the `diffuse` library.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A parameter (flag, config field, function argument) is outside its allowed range.
    #[error("invalid {name}: {message}")]
    InvalidParameter {
        /// The parameter's name as the user spells it (`timesteps`, `beta_start`, ...).
        name: String,
        /// What was wrong and what is allowed.
        message: String,
    },

    /// An input file has the wrong format or content.
    #[error("{}: {message}", path.display())]
    BadInput {
        /// The offending file or directory.
        path: PathBuf,
        /// What was wrong and what was expected.
        message: String,
    },

    /// Reading or writing a file failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file involved.
        path: PathBuf,
        /// The underlying I/O error.
        #[source]
        source: std::io::Error,
    },

    /// A numerical failure (NaN, a non-positive-definite matrix, an integrator that did not converge).
    #[error("numerical error: {0}")]
    Numerical(String),

    /// An error from the tensor framework.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),

    /// Data-parallel training: this rank's own error, after every rank agreed to stop on it
    /// (see [`crate::train::distributed`]). Shown as `rank R of K: <error>; <note>`, or as the
    /// bare error when every rank failed the same way.
    #[error("{}", on_rank_message(*rank, *size, *all, inner, note))]
    OnRank {
        /// The rank reporting.
        rank: usize,
        /// The number of ranks.
        size: usize,
        /// Every rank failed (the same way): nothing rank-specific to say.
        all: bool,
        /// What the stop left behind (the last checkpoint).
        note: String,
        /// The error.
        inner: Box<Error>,
    },

    /// Data-parallel training: rank `rank` failed and reports why; this rank stopped with it
    /// and has nothing to add (the CLI prints nothing for it and exits with the same status).
    #[error("rank {rank} of {size} failed (it reports why); every rank stopped")]
    PeerFailed {
        /// The rank that reports the error.
        rank: usize,
        /// The number of ranks.
        size: usize,
        /// Whether that rank's error is the user's input (exit code 2).
        user_error: bool,
    },
}

fn on_rank_message(rank: usize, size: usize, all: bool, inner: &Error, note: &str) -> String {
    match (all, note.is_empty()) {
        (true, _) => inner.to_string(),
        (false, true) => format!("rank {rank} of {size}: {inner}"),
        (false, false) => format!("rank {rank} of {size}: {inner}; {note}"),
    }
}

impl Error {
    /// An [`Error::InvalidParameter`].
    pub fn param(name: impl Into<String>, message: impl Into<String>) -> Self {
        Error::InvalidParameter {
            name: name.into(),
            message: message.into(),
        }
    }

    /// An [`Error::BadInput`] about `path`.
    pub fn bad_input(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Error::BadInput {
            path: path.into(),
            message: message.into(),
        }
    }

    /// An [`Error::Io`] about `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    /// True when the error is the user's input (a bad parameter or a bad file): the CLI exits
    /// with code 2 for these and 1 for everything else. An I/O error is the user's when the
    /// path they gave does not exist (or exists where it must not), may not be read or written,
    /// is a file where a directory is needed (or the reverse), lies on a read-only file system,
    /// or holds data that is not
    /// what it should be (`InvalidData`, e.g. text that is not UTF-8). A full disk, a file over
    /// the size limit and other failures of the machine are not (exit 1).
    pub fn is_user_error(&self) -> bool {
        use std::io::ErrorKind as K;
        match self {
            Error::InvalidParameter { .. } | Error::BadInput { .. } => true,
            Error::Io { source, .. } => matches!(
                source.kind(),
                K::NotFound
                    | K::AlreadyExists
                    | K::PermissionDenied
                    | K::NotADirectory
                    | K::IsADirectory
                    | K::ReadOnlyFilesystem
                    | K::InvalidData
            ),
            Error::OnRank { inner, .. } => inner.is_user_error(),
            Error::PeerFailed { user_error, .. } => *user_error,
            _ => false,
        }
    }
}

/// `Result` with the library's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

/// `text` for a one-line message: control characters (a newline or a stray byte that a damaged
/// file put into a name or into a parser's own message) shown escaped, everything else as is.
pub fn escape_controls(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// Checks that `value` is finite and lies in the open/closed interval described by
/// `(lo, lo_inclusive)` .. `(hi, hi_inclusive)`; the error names the parameter and the range.
pub fn check_range(
    name: &str,
    value: f64,
    (lo, lo_inclusive): (f64, bool),
    (hi, hi_inclusive): (f64, bool),
) -> Result<f64> {
    let above = if lo_inclusive { value >= lo } else { value > lo };
    let below = if hi_inclusive { value <= hi } else { value < hi };
    if value.is_finite() && above && below {
        Ok(value)
    } else {
        Err(Error::param(
            name,
            format!(
                "got {value}, expected a number in {}{lo}, {hi}{}",
                if lo_inclusive { "[" } else { "(" },
                if hi_inclusive { "]" } else { ")" }
            ),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_controls_keeps_a_message_on_one_line() {
        assert_eq!(escape_controls("a\nb\u{1f}"), "a\\nb\\u{1f}");
    }

    #[test]
    fn check_range_names_parameter_and_interval() {
        let err = check_range("beta_start", 2.0, (0.0, false), (1.0, false)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid beta_start: got 2, expected a number in (0, 1)"
        );
        assert!(err.is_user_error());
        assert!(check_range("x", f64::NAN, (0.0, true), (1.0, true)).is_err());
        assert!(check_range("x", 0.0, (0.0, true), (1.0, true)).is_ok());
        assert!(check_range("x", 0.0, (0.0, false), (1.0, true)).is_err());
        assert!(check_range("x", 1.0, (0.0, false), (1.0, true)).is_ok());
    }
}
