//! `diffuse train` as one of K ranks (`mpirun -n K diffuse train ...`, built with `--features
//! mpi`): the engine, the checks every rank must pass together, and one line per failure.
//!
//! Every rank runs the whole command. Ranks other than 0 print nothing on stdout (rank 0
//! alone reports, logs and writes); an error is printed once, by the lowest rank it happened
//! on, and every rank exits with its status (see `diffuse::train::distributed`).

use std::rc::Rc;

use diffuse::train::distributed::{self, Collective};

/// The engine this process was started on (one process unless a launcher started K > 1
/// ranks), after the checks the ranks make together: the same command line everywhere.
pub fn launch(device: &candle_core::Device) -> anyhow::Result<Rc<dyn Collective>> {
    let comm = distributed::from_launcher(device)?;
    if comm.size() == 1 {
        return Ok(comm);
    }
    // K ranks on a node share its cores: one rayon pool of cores / K threads each, unless
    // --threads or RAYON_NUM_THREADS says otherwise
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let threads = (cores / distributed::local_size().max(1)).max(1);
        let _ = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build_global();
    }
    if comm.rank() != 0 {
        silence_stdout();
    }
    same_command_line(comm.as_ref())?;
    Ok(comm)
}

/// Every rank's outcome of the command, agreed: `Ok` on every rank, or the error once (on the
/// lowest failing rank, naming it) and [`diffuse::Error::PeerFailed`] everywhere else. Errors
/// the library already agreed on pass through.
pub fn finish(comm: &dyn Collective, result: anyhow::Result<()>) -> anyhow::Result<()> {
    if comm.size() == 1 {
        return result;
    }
    if let Err(e) = &result {
        let agreed = e.chain().any(|c| {
            matches!(
                c.downcast_ref::<diffuse::Error>(),
                Some(diffuse::Error::OnRank { .. } | diffuse::Error::PeerFailed { .. })
            )
        });
        if agreed {
            return result;
        }
    }
    let status = result.as_ref().err().map_or(0, |e| super::exit_code(e) as u64);
    let statuses = comm.all_gather_u64(status)?;
    let failed: Vec<usize> = (0..statuses.len()).filter(|&r| statuses[r] != 0).collect();
    let Some(&reporter) = failed.first() else {
        return result;
    };
    super::ending();
    if let Err(e) = result {
        if comm.rank() == reporter {
            let e = if failed.len() == comm.size() {
                e
            } else {
                e.context(format!("rank {reporter} of {}", comm.size()))
            };
            eprintln!("error: {}", super::one_line(&e));
        }
    }
    // Every rank waits until the reporter has printed its line: mpirun ends the job (SIGTERM to
    // the rest) as soon as the first rank exits with an error, which could otherwise come
    // before the line, or make a rank's signal handler print a line of its own.
    comm.all_gather_u64(0)?;
    // every rank, the reporter too, exits with the reporter's status and prints nothing more
    Err(diffuse::Error::PeerFailed {
        rank: reporter,
        size: comm.size(),
        user_error: statuses[reporter] == 2,
    }
    .into())
}

/// Refuses ranks started with different flags (MPMD launches: `mpirun -n 1 A : -n 1 B`).
fn same_command_line(comm: &dyn Collective) -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let joined = args.join("\u{1f}");
    // FNV-1a of the command line
    let hash = joined.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    });
    let hashes = comm.all_gather_u64(hash)?;
    let Some(other) = hashes.iter().position(|&h| h != hashes[0]) else {
        return Ok(());
    };
    let mut theirs = joined.clone().into_bytes();
    comm.broadcast_bytes(&mut theirs, other)?;
    if comm.rank() == 0 {
        eprintln!("error: {}", mismatch_message(&args, &theirs, other));
    }
    // The other ranks wait until rank 0 has said why: mpirun ends the whole job as soon as the
    // first rank exits with an error, which could otherwise be before rank 0 printed anything.
    comm.all_gather_u64(0)?;
    Err(diffuse::Error::PeerFailed {
        rank: 0,
        size: comm.size(),
        user_error: true,
    }
    .into())
}

/// What rank 0 says when rank `other` was started with the command line `theirs` (arguments
/// joined by U+001F) instead of `args`.
fn mismatch_message(args: &[String], theirs: &[u8], other: usize) -> String {
    let theirs: Vec<String> = String::from_utf8_lossy(theirs)
        .split('\u{1f}')
        .map(str::to_string)
        .collect();
    let at = args
        .iter()
        .zip(&theirs)
        .position(|(a, b)| a != b)
        .unwrap_or(args.len().min(theirs.len()));
    let around = |v: &[String]| {
        let from = at.saturating_sub(1);
        let shown = v[from.min(v.len())..(at + 1).min(v.len())].join(" ");
        if shown.is_empty() {
            "nothing".to_string()
        } else {
            format!("`{shown}`")
        }
    };
    format!(
        "rank {other} was started with other flags than rank 0 ({} where rank 0 has {}); every \
         rank of `diffuse train` needs the same command line",
        around(&theirs),
        around(args)
    )
}

/// Sends this process's stdout to /dev/null (ranks other than 0).
fn silence_stdout() {
    use std::os::fd::AsRawFd;
    if let Ok(null) = std::fs::OpenOptions::new().write(true).open("/dev/null") {
        // SAFETY: dup2 onto the standard output descriptor; `null` stays open until then.
        unsafe {
            libc::dup2(null.as_raw_fd(), libc::STDOUT_FILENO);
        }
    }
}
