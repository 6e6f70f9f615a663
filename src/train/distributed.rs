//! Data-parallel training over K ranks: one process per worker, launched by `mpirun` (or any
//! MPI launcher), ranks and collectives from MPI, the gradients summed with one collective per
//! step (improved-diffusion's `dist_util` design; NCCL for the gradients on GPUs).
//!
//! ```text
//! start     every rank builds the same run; one agreement (all ranks fine?), then rank 0
//!           broadcasts the weights, the EMA and the optimizer moments (one flat f32 buffer)
//! step s    rank r takes samples [r B/K, (r+1) B/K) of the global batch of B and computes
//!           grad_r = grad (B_local / B) mean_local loss  (the task scales its loss by 1/K)
//!           one sum all-reduce of the flat buffer [grad_r | loss_r, stop flags, status, times]
//!           sum_r grad_r = grad of the global mean loss: the single process's gradient
//!           every rank: clipping by the global norm of that sum, AdamW, EMA (same arithmetic on
//!           the same buffer, so bitwise the same weights everywhere)
//!           rank 0 alone: metrics.jsonl, progress, sample grids, atomic checkpoints
//! end       one agreement, then the ranks compare fingerprints of their weights
//! ```
//!
//! K-independence: which images, flips, timesteps, noise, labels and dropout masks a step uses
//! is a function of the seed, the step and the global sample index, never of K (see
//! [`crate::train::image`]), so K ranks reproduce the single-process run to the rounding of the
//! gradient sum (about 1e-6 relative over 30 steps; `tests/mpi_train.rs`, `tests/data_parallel.rs`).
//!
//! Faults and signals: every rank runs the same sequence of collectives. A rank whose step (or
//! whose checkpoint, hook, metrics line) fails does not leave: it joins the next collective
//! with its failure in the status slots, so all ranks stop together at the same step; the
//! lowest failing rank reports its error (one line, naming the rank), the others return
//! [`Error::PeerFailed`] (the CLI prints nothing for it and exits with the same code). A rank
//! that dies (killed, crashed) is the launcher's to report: `mpirun` prints which rank and
//! which signal and terminates the others. A stop request (Ctrl-C, SIGTERM: `mpirun` turns
//! either into SIGTERM to every rank) and the end of a `--minutes` budget travel in the same
//! buffer, so every rank stops after the same step and rank 0 writes one checkpoint.
//!
//! The [`Collective`] trait is the whole interface to the engine: [`SingleProcess`] (the
//! default, a no-op), MPI behind the `mpi` feature, NCCL for the gradient buffer behind the
//! `nccl` feature (`cuda` + `mpi`; unverified).

use std::path::Path;
use std::rc::Rc;
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor, Var};
use serde::Serialize;

use crate::error::{Error, Result};
use crate::train::metrics::MetricRecord;
use crate::train::{
    checkpoint, Budget, Interrupt, LoopOptions, StopReason, TrainOutcome, TrainTask, Trainer,
};

/// The ranks of a job and the collectives between them (every call is collective: all ranks
/// make the same calls in the same order).
pub trait Collective {
    /// This process's rank, `0 .. size`.
    fn rank(&self) -> usize;
    /// The number of ranks K.
    fn size(&self) -> usize;
    /// The engine, for messages ("single process", "MPI", "MPI + NCCL").
    fn name(&self) -> &'static str;
    /// `buf = sum over ranks of buf`, in place.
    fn all_reduce_sum_f32(&self, buf: &mut [f32]) -> Result<()>;
    /// `buf = root's buf` on every rank.
    fn broadcast_f32(&self, buf: &mut [f32], root: usize) -> Result<()>;
    /// Every rank's `value`, in rank order.
    fn all_gather_u64(&self, value: u64) -> Result<Vec<u64>>;
    /// `bytes = root's bytes` on every rank (any length).
    fn broadcast_bytes(&self, bytes: &mut Vec<u8>, root: usize) -> Result<()>;
    /// The sum over ranks of a flat f32 tensor (rank 1). The default goes through host memory
    /// with [`Collective::all_reduce_sum_f32`]; the NCCL engine keeps GPU tensors on the GPU.
    fn all_reduce_sum_tensor(&self, flat: &Tensor) -> Result<Tensor> {
        let mut host = flat.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        self.all_reduce_sum_f32(&mut host)?;
        let n = host.len();
        Ok(Tensor::from_vec(host, n, flat.device())?)
    }
}

/// One process, no communication: every collective is the identity.
#[derive(Clone, Copy, Debug, Default)]
pub struct SingleProcess;

impl Collective for SingleProcess {
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        1
    }
    fn name(&self) -> &'static str {
        "single process"
    }
    fn all_reduce_sum_f32(&self, _buf: &mut [f32]) -> Result<()> {
        Ok(())
    }
    fn broadcast_f32(&self, _buf: &mut [f32], _root: usize) -> Result<()> {
        Ok(())
    }
    fn all_gather_u64(&self, value: u64) -> Result<Vec<u64>> {
        Ok(vec![value])
    }
    fn broadcast_bytes(&self, _bytes: &mut Vec<u8>, _root: usize) -> Result<()> {
        Ok(())
    }
    fn all_reduce_sum_tensor(&self, flat: &Tensor) -> Result<Tensor> {
        Ok(flat.clone())
    }
}

/// The default engine: one process.
pub fn single_process() -> Rc<dyn Collective> {
    Rc::new(SingleProcess)
}

/// Which part of every global batch a rank computes: rank `rank` of `size` takes samples
/// `[rank B / size, (rank + 1) B / size)` of the global batch of `B`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shard {
    /// This rank.
    pub rank: usize,
    /// The number of ranks.
    pub size: usize,
}

impl Shard {
    /// The whole batch (one process).
    pub const WHOLE: Shard = Shard { rank: 0, size: 1 };

    /// `(first, count)`: the global indices `first .. first + count` of this rank's samples in
    /// a global batch of `batch`. `batch` must be a multiple of `size` ([`Shard::check`]).
    pub fn range(&self, batch: usize) -> (usize, usize) {
        let n = batch / self.size;
        (self.rank * n, n)
    }

    /// Refuses a global batch that the ranks cannot share equally (each rank takes B / K).
    pub fn check(&self, batch: usize) -> Result<()> {
        if batch % self.size != 0 || batch < self.size {
            return Err(Error::param(
                "batch",
                format!(
                    "the global batch {batch} does not split evenly over {} ranks (each rank takes \
                     batch / ranks images); use a multiple of {}",
                    self.size, self.size
                ),
            ));
        }
        Ok(())
    }
}

/// The launcher's world size and this process's rank, from the environment every MPI launcher
/// sets (Open MPI's `OMPI_COMM_WORLD_SIZE` / `OMPI_COMM_WORLD_RANK`, MPICH's and Intel MPI's
/// `PMI_SIZE` / `PMI_RANK`); `None` when the process was not started by a launcher.
pub fn launcher_world() -> Option<(usize, usize)> {
    let var = |k: &str| std::env::var(k).ok().and_then(|v| v.trim().parse::<usize>().ok());
    for (size, rank) in [
        ("OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK"),
        ("PMI_SIZE", "PMI_RANK"),
    ] {
        if let Some(k) = var(size) {
            return Some((var(rank).unwrap_or(0), k));
        }
    }
    None
}

/// The number of ranks on this node (`OMPI_COMM_WORLD_LOCAL_SIZE`, `MPI_LOCALNRANKS`), 1 when
/// not launched.
pub fn local_size() -> usize {
    ["OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS"]
        .iter()
        .find_map(|k| std::env::var(k).ok().and_then(|v| v.trim().parse().ok()))
        .unwrap_or(1)
}

/// This rank's index on its node (`OMPI_COMM_WORLD_LOCAL_RANK`, `MPI_LOCALRANKID`): the GPU it
/// uses. 0 when not launched.
pub fn local_rank() -> usize {
    ["OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID"]
        .iter()
        .find_map(|k| std::env::var(k).ok().and_then(|v| v.trim().parse().ok()))
        .unwrap_or(0)
}

/// The engine this process was launched on: [`SingleProcess`] unless a launcher started K > 1
/// ranks; then MPI (and NCCL for the gradients of GPU tensors on `device`, with the `nccl`
/// feature). A K > 1 launch of a build without the `mpi` feature is refused (rather than
/// training K independent copies into one directory): rank 0 gets the error, the other ranks
/// [`Error::PeerFailed`].
pub fn from_launcher(device: &Device) -> Result<Rc<dyn Collective>> {
    let Some((rank, size)) = launcher_world().filter(|&(_, k)| k > 1) else {
        return Ok(single_process());
    };
    #[cfg(feature = "mpi")]
    {
        let _ = rank;
        let mpi = mpi_engine::MpiCollective::init(size)?;
        #[cfg(feature = "nccl")]
        {
            if device.is_cuda() {
                return Ok(Rc::new(nccl_engine::NcclCollective::new(mpi, device)?));
            }
        }
        let _ = device;
        Ok(Rc::new(mpi))
    }
    #[cfg(not(feature = "mpi"))]
    {
        let _ = device;
        if rank != 0 {
            return Err(Error::PeerFailed {
                rank: 0,
                size,
                user_error: true,
            });
        }
        Err(Error::param(
            "launch",
            format!(
                "started as one of {size} ranks by an MPI launcher, but this diffuse was built \
                 without the `mpi` feature, so the ranks would train {size} independent copies; \
                 rebuild with `cargo build --release --features mpi`, or run without mpirun"
            ),
        ))
    }
}

/// Exit status of a rank's outcome in an agreement: 0 fine, 1 failed, 2 failed on bad input.
pub fn status_of(result: &Result<()>) -> u64 {
    result.as_ref().err().map_or(0, error_status)
}

/// 2 for an error in the user's input, 1 for any other.
fn error_status(e: &Error) -> u64 {
    if e.is_user_error() {
        2
    } else {
        1
    }
}

/// FNV-1a over the bits of `values`, continuing from `hash` (start with [`FNV_OFFSET`]).
pub fn fingerprint(hash: u64, values: &[f32]) -> u64 {
    values.iter().fold(hash, |h, v| {
        (h ^ v.to_bits() as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// The FNV-1a offset basis.
pub const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

/// What the gradient exchange cost over a run (rank 0's view).
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct ExchangeStats {
    /// The engine.
    pub engine: String,
    /// Ranks.
    pub ranks: usize,
    /// Steps measured (this session).
    pub steps: u64,
    /// Bytes all-reduced per step: the flat gradient buffer plus its control slots (f32).
    pub bytes_per_step: usize,
    /// Seconds of whole steps (local forward/backward through the update), summed.
    pub step_seconds: f64,
    /// Seconds inside the all-reduce call, summed (includes waiting for the slowest rank).
    pub all_reduce_seconds: f64,
    /// The part of `all_reduce_seconds` spent waiting for a slower rank: the slowest rank's
    /// local compute time minus this rank's, summed.
    pub wait_seconds: f64,
    /// Seconds flattening the gradients into the buffer and back, summed.
    pub pack_seconds: f64,
}

impl ExchangeStats {
    /// Mean milliseconds per step of `seconds`.
    pub fn per_step_ms(&self, seconds: f64) -> f64 {
        1e3 * seconds / self.steps.max(1) as f64
    }

    /// One line for people.
    pub fn summary(&self) -> String {
        let step = self.per_step_ms(self.step_seconds);
        let reduce = self.per_step_ms(self.all_reduce_seconds);
        format!(
            "all-reduce ({}, {} ranks): {:.2} MB per step, {reduce:.2} ms per step ({:.1}% of the \
             {step:.1} ms step; of which {:.2} ms waiting for the slowest rank), packing {:.2} ms",
            self.engine,
            self.ranks,
            self.bytes_per_step as f64 / 1e6,
            100.0 * reduce / step.max(1e-12),
            self.per_step_ms(self.wait_seconds),
            self.per_step_ms(self.pack_seconds),
        )
    }
}

/// The control slots after the gradients in the step buffer: the loss contribution, the two
/// stop flags, then per rank its status and its local compute milliseconds.
const LOSS: usize = 0;
const TIME_UP: usize = 1;
const INTERRUPT: usize = 2;
const STATUS: usize = 3;

/// What one exchanged step decided.
struct StepOutcome {
    /// The step's record; `None` when the update failed here (the error is pending).
    record: Option<MetricRecord>,
    /// Some rank's clock reached the time budget.
    time_up: bool,
    /// Some rank was asked to stop.
    interrupted: bool,
}

impl Trainer {
    /// [`Trainer::run`] over K > 1 ranks (see the module docs).
    pub(super) fn run_data_parallel(
        &mut self,
        task: &mut dyn TrainTask,
        budget: &Budget,
        options: &LoopOptions,
        interrupt: &Interrupt,
    ) -> Result<TrainOutcome> {
        let comm = self.comm.clone();
        let (rank, size) = (comm.rank(), comm.size());
        let root = rank == 0;
        let start = Instant::now();
        // 1. every rank checks the budget and takes its share of the batch: one agreement
        let local = super::check_budget(budget).and_then(|_| task.set_shard(Shard { rank, size }));
        self.agree(local)?;
        let steps = comm.all_gather_u64(self.step)?;
        if steps.iter().any(|&s| s != steps[0]) {
            let list: Vec<String> = steps
                .iter()
                .enumerate()
                .map(|(r, s)| format!("rank {r}: {s}"))
                .collect();
            return Err(self.everyone(Error::param(
                "resume",
                format!(
                    "the ranks resumed at different steps ({}); every rank must read the same run directory",
                    list.join(", ")
                ),
            )));
        }
        // 2. rank 0's state everywhere
        self.broadcast_state()?;
        // 3. the loop
        let params = self.named_var_list()?;
        let total: usize = params.iter().map(|(_, v)| v.elem_count()).sum();
        let control_len = STATUS + 2 * size;
        let mut stats = ExchangeStats {
            engine: comm.name().into(),
            ranks: size,
            bytes_per_step: 4 * (total + control_len),
            ..ExchangeStats::default()
        };
        let time_limit = budget.minutes.map(|m| Duration::from_secs_f64(m * 60.0));
        let progress = super::Progress::new(options.progress && root, budget, self.step);
        let session_first = self.step;
        let mut pending: Option<Error> = None;
        let mut time_up = false;
        let stop = loop {
            if budget.steps.is_some_and(|n| self.step >= n) {
                break StopReason::Steps;
            }
            if time_up {
                break StopReason::Time;
            }
            let out = self.exchange_step(
                task,
                &params,
                start,
                time_limit,
                interrupt,
                &mut pending,
                &mut stats,
            )?;
            time_up = out.time_up;
            let Some(record) = out.record else {
                continue; // the error goes to every rank with the next collective
            };
            progress.update(
                &record,
                self.step - session_first,
                start.elapsed(),
                budget,
                self.metrics.records(),
            );
            if root && options.hook_every > 0 && self.step % options.hook_every == 0 {
                if let Err(e) = self.call_hook(task) {
                    pending = Some(e);
                    continue;
                }
            }
            if out.interrupted {
                break StopReason::Interrupted;
            }
            if options.checkpoint_every > 0 && self.step % options.checkpoint_every == 0 {
                if let Err(e) = self.checkpoint_on_root(task, start) {
                    pending = Some(e);
                }
            }
        };
        progress.finish();
        if pending.is_none() && root && (options.hook_every == 0 || self.step % options.hook_every != 0) {
            pending = self.call_hook(task).err();
        }
        if pending.is_none() && self.last_checkpoint_step != Some(self.step) {
            pending = self.checkpoint_on_root(task, start).err();
        } else if pending.is_none() && root {
            // nothing new since the last checkpoint; still refresh the picture and the log
            pending = self.refresh_log().err();
        }
        // 4. every rank fine? then the same weights everywhere?
        self.agree(pending.map_or(Ok(()), Err))?;
        let mut print = FNV_OFFSET;
        for (_, var) in &params {
            print = fingerprint(print, &var.as_tensor().flatten_all()?.to_vec1::<f32>()?);
        }
        let prints = comm.all_gather_u64(print)?;
        if let Some(r) = prints.iter().position(|&p| p != prints[0]) {
            return Err(self.everyone(Error::Numerical(format!(
                "after step {} the weights of rank {r} differ from rank 0's: the ranks diverged \
                 (different builds or thread counts?); the checkpoint of rank 0 was written",
                self.step
            ))));
        }
        Ok(TrainOutcome {
            step: self.step,
            session_steps: self.step - session_first,
            session_seconds: start.elapsed().as_secs_f64(),
            stop,
            last: self.metrics.records().last().cloned(),
            checkpoint: self.run_dir.join(checkpoint::CHECKPOINT_DIR),
            exchange: Some(stats),
        })
    }

    /// One step: this rank's share, the all-reduce, then the same update on every rank.
    #[allow(clippy::too_many_arguments)]
    fn exchange_step(
        &mut self,
        task: &mut dyn TrainTask,
        params: &[(String, Var)],
        start: Instant,
        time_limit: Option<Duration>,
        interrupt: &Interrupt,
        pending: &mut Option<Error>,
        stats: &mut ExchangeStats,
    ) -> Result<StepOutcome> {
        let comm = self.comm.clone();
        let (rank, size) = (comm.rank(), comm.size());
        let t0 = Instant::now();
        let step = self.step + 1;
        // this rank's share: its loss contribution and gradients, or the error it ran into
        let local = match pending.take() {
            Some(e) => Err(e),
            None => task.loss(step, &mut self.rng).and_then(|loss| {
                let value = loss.to_dtype(DType::F32)?.to_scalar::<f32>()?;
                let _prof = crate::ops::profile::scope("backward");
                Ok((value, loss.backward()?))
            }),
        };
        let compute = t0.elapsed();
        let mut control = vec![0f32; STATUS + 2 * size];
        control[TIME_UP] = time_limit.is_some_and(|l| start.elapsed() >= l) as u8 as f32;
        control[INTERRUPT] = interrupt.is_triggered() as u8 as f32;
        control[STATUS + size + rank] = 1e3 * compute.as_secs_f32();
        let device = params
            .first()
            .map(|(_, v)| v.as_tensor().device().clone())
            .unwrap_or(Device::Cpu);
        let (grads, error) = match local {
            Ok((loss, grads)) => {
                control[LOSS] = loss;
                (Some(grads), None)
            }
            Err(e) => {
                control[STATUS + rank] = error_status(&e) as f32;
                (None, Some(e))
            }
        };
        let t_pack = Instant::now();
        let mut parts = Vec::with_capacity(params.len() + 1);
        for (_, var) in params {
            match grads.as_ref().and_then(|g| g.get(var.as_tensor())) {
                Some(g) => parts.push(g.to_dtype(DType::F32)?.flatten_all()?),
                None => parts.push(Tensor::zeros(var.elem_count(), DType::F32, &device)?),
            }
        }
        parts.push(Tensor::from_slice(&control, control.len(), &device)?);
        let flat = Tensor::cat(&parts, 0)?;
        let mut pack = t_pack.elapsed();
        let t_reduce = Instant::now();
        let reduced = comm.all_reduce_sum_tensor(&flat)?;
        let total = flat.elem_count() - control.len();
        let control = reduced.narrow(0, total, control.len())?.to_vec1::<f32>()?;
        let reduce = t_reduce.elapsed();
        let statuses: Vec<u64> = control[STATUS..STATUS + size]
            .iter()
            .map(|&v| v.round() as u64)
            .collect();
        self.verdict(&statuses, error)?;
        let slowest = control[STATUS + size..].iter().fold(0f32, |a, &b| a.max(b));
        let outcome = |record| StepOutcome {
            record,
            time_up: control[TIME_UP] > 0.0,
            interrupted: control[INTERRUPT] > 0.0,
        };
        let Some(mut grads) = grads else {
            return Err(Error::Numerical(
                "internal: a failed rank passed the agreement".into(),
            ));
        };
        let loss_value = control[LOSS] as f64;
        if !loss_value.is_finite() {
            *pending = Some(self.non_finite_loss(loss_value, step));
            return Ok(outcome(None));
        }
        let t_unpack = Instant::now();
        let mut offset = 0;
        for (_, var) in params {
            let n = var.elem_count();
            let t = var.as_tensor();
            if grads.get(t).is_some() {
                let g = reduced.narrow(0, offset, n)?.reshape(t.dims())?;
                grads.insert(t, g);
            }
            offset += n;
        }
        pack += t_unpack.elapsed();
        let update = self
            .optimizer
            .apply(&grads)
            .and_then(|s| self.ema.update().map(|_| s));
        let stats_step = match update {
            Ok(s) => s,
            Err(e) => {
                *pending = Some(e);
                return Ok(outcome(None));
            }
        };
        self.step = step;
        let record = MetricRecord {
            step,
            loss: loss_value,
            lr: stats_step.lr,
            grad_norm: stats_step.grad_norm,
            elapsed_s: self.elapsed_before + start.elapsed().as_secs_f64(),
            eval: None,
        };
        if let Err(e) = self.metrics.append(record.clone()) {
            *pending = Some(e);
        }
        stats.steps += 1;
        stats.step_seconds += t0.elapsed().as_secs_f64();
        stats.all_reduce_seconds += reduce.as_secs_f64();
        stats.wait_seconds += ((slowest as f64 - 1e3 * compute.as_secs_f64()) / 1e3).max(0.0);
        stats.pack_seconds += pack.as_secs_f64();
        Ok(outcome(Some(record)))
    }

    /// The variables in name order (the order of the flat buffers).
    fn named_var_list(&self) -> Result<Vec<(String, Var)>> {
        let data = self
            .varmap
            .data()
            .lock()
            .map_err(|_| Error::Numerical("the VarMap's lock is poisoned".into()))?;
        let mut out: Vec<(String, Var)> = data.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    /// Rank 0's weights, EMA and optimizer moments on every rank (one broadcast).
    fn broadcast_state(&mut self) -> Result<()> {
        let comm = self.comm.clone();
        let weights: Vec<(String, Tensor)> = self
            .named_var_list()?
            .into_iter()
            .map(|(n, v)| (n, v.as_tensor().clone()))
            .collect();
        let ema = self.ema.tensors();
        let moments = self.optimizer.state_tensors();
        let groups = [&weights, &ema, &moments];
        let mut flat = Vec::new();
        for group in groups {
            for (_, t) in group.iter() {
                flat.extend(t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?);
            }
        }
        comm.broadcast_f32(&mut flat, 0)?;
        if comm.rank() == 0 {
            return Ok(());
        }
        let mut offset = 0;
        let mut rebuilt = Vec::with_capacity(3);
        for group in groups {
            let mut map = std::collections::HashMap::new();
            for (name, t) in group.iter() {
                let n = t.elem_count();
                let v = Tensor::from_slice(&flat[offset..offset + n], t.dims(), t.device())?;
                map.insert(name.clone(), v);
                offset += n;
            }
            rebuilt.push(map);
        }
        let source = Path::new("rank 0");
        for (name, var) in self.named_var_list()? {
            if let Some(v) = rebuilt[0].get(&name) {
                var.set(v)?;
            }
        }
        self.ema.load_state(&rebuilt[1], self.ema.updates(), source)?;
        self.optimizer
            .load_state(&rebuilt[2], self.optimizer.step(), source)?;
        Ok(())
    }

    /// Rank 0 writes the checkpoint; every rank notes the step (an error is rank 0's).
    fn checkpoint_on_root(&mut self, task: &dyn TrainTask, start: Instant) -> Result<()> {
        if self.comm.rank() == 0 {
            self.save_checkpoint(task, Some(start))?;
        } else {
            self.last_checkpoint_step = Some(self.step);
        }
        Ok(())
    }

    /// Every rank learns every rank's outcome; `Err` on every rank when one failed.
    fn agree(&self, local: Result<()>) -> Result<()> {
        let statuses = self.comm.all_gather_u64(status_of(&local))?;
        self.verdict(&statuses, local.err())
    }

    /// `Ok` when every status is 0; else the lowest failing rank's own error (wrapped in
    /// [`Error::OnRank`]) on that rank and [`Error::PeerFailed`] on the others.
    fn verdict(&self, statuses: &[u64], mine: Option<Error>) -> Result<()> {
        let failed: Vec<usize> = (0..statuses.len()).filter(|&r| statuses[r] != 0).collect();
        let Some(&reporter) = failed.first() else {
            return Ok(());
        };
        let (rank, size) = (self.comm.rank(), self.comm.size());
        if rank == reporter {
            let inner = mine.unwrap_or_else(|| Error::Numerical("failed".into()));
            return Err(Error::OnRank {
                rank,
                size,
                all: failed.len() == size,
                note: self.stop_note(),
                inner: Box::new(inner),
            });
        }
        Err(Error::PeerFailed {
            rank: reporter,
            size,
            user_error: statuses[reporter] == 2,
        })
    }

    /// An error every rank reached in the same state: reported by rank 0 alone.
    fn everyone(&self, e: Error) -> Error {
        let (rank, size) = (self.comm.rank(), self.comm.size());
        if rank == 0 {
            Error::OnRank {
                rank,
                size,
                all: true,
                note: String::new(),
                inner: Box::new(e),
            }
        } else {
            Error::PeerFailed {
                rank: 0,
                size,
                user_error: e.is_user_error(),
            }
        }
    }

    /// What a stopped data-parallel run left behind.
    fn stop_note(&self) -> String {
        match self.last_checkpoint_step {
            Some(s) => format!(
                "every rank stopped; the checkpoint of step {s} in {} is intact (continue with --resume)",
                self.run_dir.display()
            ),
            None => "every rank stopped; no checkpoint was written yet".into(),
        }
    }
}

/// The MPI engine (`--features mpi`): rsmpi over the system's MPI library.
#[cfg(feature = "mpi")]
pub mod mpi_engine {
    use candle_core::{DType, Tensor};
    use mpi::collective::{CommunicatorCollectives, SystemOperation};
    use mpi::topology::{Communicator, SimpleCommunicator};
    use mpi::traits::Root;

    use super::Collective;
    use crate::error::{Error, Result};

    /// MPI_COMM_WORLD of an initialised MPI (finalised when dropped).
    pub struct MpiCollective {
        // dropped last: MPI_Finalize
        _universe: mpi::environment::Universe,
        world: SimpleCommunicator,
    }

    impl MpiCollective {
        /// Initialises MPI (funneled: rayon's threads compute, the main thread communicates) and
        /// checks that the world has the `expected` size the launcher announced.
        pub fn init(expected: usize) -> Result<Self> {
            let (universe, _) = mpi::initialize_with_threading(mpi::Threading::Funneled)
                .ok_or_else(|| Error::Numerical("MPI was already initialised".into()))?;
            let world = universe.world();
            if world.size() as usize != expected {
                return Err(Error::Numerical(format!(
                    "the launcher announced {expected} ranks but MPI_COMM_WORLD has {} \
                     (is this diffuse linked against the MPI library of the mpirun that started it?)",
                    world.size()
                )));
            }
            Ok(MpiCollective {
                _universe: universe,
                world,
            })
        }
    }

    /// Elements per MPI call (counts are C ints).
    const MAX_COUNT: usize = 1 << 30;

    impl MpiCollective {
        /// `recv = sum over ranks of send` (MPI_Allreduce, MPI_SUM over MPI_FLOAT).
        fn all_reduce_into(&self, send: &[f32], recv: &mut [f32]) {
            for (s, r) in send.chunks(MAX_COUNT).zip(recv.chunks_mut(MAX_COUNT)) {
                self.world.all_reduce_into(s, r, SystemOperation::sum());
            }
        }
    }

    impl Collective for MpiCollective {
        fn rank(&self) -> usize {
            self.world.rank() as usize
        }
        fn size(&self) -> usize {
            self.world.size() as usize
        }
        fn name(&self) -> &'static str {
            "MPI"
        }
        fn all_reduce_sum_f32(&self, buf: &mut [f32]) -> Result<()> {
            let send = buf.to_vec();
            self.all_reduce_into(&send, buf);
            Ok(())
        }
        fn all_reduce_sum_tensor(&self, flat: &Tensor) -> Result<Tensor> {
            // the host copy of the tensor is the send buffer, a fresh one receives
            let send = flat.to_dtype(DType::F32)?.to_vec1::<f32>()?;
            let mut recv = vec![0f32; send.len()];
            self.all_reduce_into(&send, &mut recv);
            let n = recv.len();
            Ok(Tensor::from_vec(recv, n, flat.device())?)
        }
        fn broadcast_f32(&self, buf: &mut [f32], root: usize) -> Result<()> {
            let root = self.world.process_at_rank(root as i32);
            for part in buf.chunks_mut(MAX_COUNT) {
                root.broadcast_into(part);
            }
            Ok(())
        }
        fn all_gather_u64(&self, value: u64) -> Result<Vec<u64>> {
            let mut out = vec![0u64; self.size()];
            self.world.all_gather_into(&value, &mut out[..]);
            Ok(out)
        }
        fn broadcast_bytes(&self, bytes: &mut Vec<u8>, root: usize) -> Result<()> {
            let process = self.world.process_at_rank(root as i32);
            let mut len = bytes.len() as u64;
            process.broadcast_into(&mut len);
            bytes.resize(len as usize, 0);
            for part in bytes.chunks_mut(MAX_COUNT) {
                process.broadcast_into(part);
            }
            Ok(())
        }
    }
}

/// The NCCL engine (`--features nccl`, i.e. `cuda` + `mpi`): MPI launches the ranks, carries the
/// control messages and hands NCCL its unique id; the gradient buffer of a GPU run is summed by
/// `ncclAllReduce` on the GPU (the pattern of candle's multi-process examples, cudarc's
/// bindings). UNVERIFIED: no machine with two GPUs (or a CUDA toolkit) was available; it has
/// not even been compiled. The seam is [`Collective::all_reduce_sum_tensor`].
#[cfg(feature = "nccl")]
pub mod nccl_engine {
    use candle_core::cuda_backend::cudarc::nccl::safe::{Comm, Id, ReduceOp};
    use candle_core::{CpuStorage, CudaStorage, CustomOp1, Device, Layout, Shape, Tensor};

    use super::mpi_engine::MpiCollective;
    use super::Collective;
    use crate::error::{Error, Result};

    /// MPI for everything but the GPU gradient sum.
    pub struct NcclCollective {
        mpi: MpiCollective,
        comm: Comm,
    }

    impl NcclCollective {
        /// One NCCL communicator over the MPI world, on `device`'s stream.
        pub fn new(mpi: MpiCollective, device: &Device) -> Result<Self> {
            let cuda = device.as_cuda_device()?;
            let (rank, size) = (mpi.rank(), mpi.size());
            let mut id = if rank == 0 {
                let id = Id::new().map_err(|e| Error::Numerical(format!("ncclGetUniqueId: {e:?}")))?;
                id.internal().iter().map(|&c| c as u8).collect()
            } else {
                vec![0u8; 128]
            };
            mpi.broadcast_bytes(&mut id, 0)?;
            let mut internal = [0 as std::ffi::c_char; 128];
            for (d, s) in internal.iter_mut().zip(&id) {
                *d = *s as std::ffi::c_char;
            }
            let comm = Comm::from_rank(cuda.cuda_stream(), rank, size, Id::uninit(internal))
                .map_err(|e| Error::Numerical(format!("ncclCommInitRank: {e:?}")))?;
            Ok(NcclCollective { mpi, comm })
        }
    }

    struct AllReduceSum<'a>(&'a Comm);

    impl CustomOp1 for AllReduceSum<'_> {
        fn name(&self) -> &'static str {
            "nccl-all-reduce-sum"
        }
        fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
            candle_core::bail!("the NCCL all-reduce takes GPU tensors")
        }
        fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
            let Some((a, b)) = l.contiguous_offsets() else {
                candle_core::bail!("the NCCL all-reduce needs a contiguous buffer")
            };
            let src = s.as_cuda_slice::<f32>()?.slice(a..b);
            let dev = s.device().clone();
            let mut dst = dev.alloc_zeros::<f32>(b - a)?;
            self.0
                .all_reduce(&src, &mut dst, &ReduceOp::Sum)
                .map_err(|e| candle_core::Error::Msg(format!("ncclAllReduce: {e:?}")))?;
            Ok((CudaStorage::wrap_cuda_slice(dst, dev), l.shape().clone()))
        }
    }

    impl Collective for NcclCollective {
        fn rank(&self) -> usize {
            self.mpi.rank()
        }
        fn size(&self) -> usize {
            self.mpi.size()
        }
        fn name(&self) -> &'static str {
            "MPI + NCCL"
        }
        fn all_reduce_sum_f32(&self, buf: &mut [f32]) -> Result<()> {
            self.mpi.all_reduce_sum_f32(buf)
        }
        fn broadcast_f32(&self, buf: &mut [f32], root: usize) -> Result<()> {
            self.mpi.broadcast_f32(buf, root)
        }
        fn all_gather_u64(&self, value: u64) -> Result<Vec<u64>> {
            self.mpi.all_gather_u64(value)
        }
        fn broadcast_bytes(&self, bytes: &mut Vec<u8>, root: usize) -> Result<()> {
            self.mpi.broadcast_bytes(bytes, root)
        }
        fn all_reduce_sum_tensor(&self, flat: &Tensor) -> Result<Tensor> {
            if !flat.device().is_cuda() {
                let mut host = flat.to_vec1::<f32>()?;
                self.mpi.all_reduce_sum_f32(&mut host)?;
                let n = host.len();
                return Ok(Tensor::from_vec(host, n, flat.device())?);
            }
            Ok(flat.contiguous()?.apply_op1_no_bwd(&AllReduceSum(&self.comm))?)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_cover_the_batch_and_odd_splits_are_refused() {
        let parts: Vec<(usize, usize)> = (0..4).map(|r| Shard { rank: r, size: 4 }.range(12)).collect();
        assert_eq!(parts, vec![(0, 3), (3, 3), (6, 3), (9, 3)]);
        assert_eq!(Shard::WHOLE.range(7), (0, 7));
        let e = Shard { rank: 0, size: 3 }.check(4).unwrap_err();
        assert!(e.is_user_error());
        assert!(
            e.to_string()
                .contains("the global batch 4 does not split evenly over 3 ranks"),
            "{e}"
        );
        assert!(Shard { rank: 1, size: 2 }.check(2).is_ok());
        assert!(Shard { rank: 0, size: 4 }.check(2).is_err());
    }

    #[test]
    fn single_process_collectives_are_the_identity() {
        let c = SingleProcess;
        let mut v = vec![1.0f32, -2.0];
        c.all_reduce_sum_f32(&mut v).unwrap();
        c.broadcast_f32(&mut v, 0).unwrap();
        assert_eq!(v, vec![1.0, -2.0]);
        assert_eq!(c.all_gather_u64(7).unwrap(), vec![7]);
        assert_eq!((c.rank(), c.size()), (0, 1));
    }

    #[test]
    fn fingerprints_see_every_bit() {
        let a = fingerprint(FNV_OFFSET, &[1.0, 2.0]);
        assert_eq!(a, fingerprint(FNV_OFFSET, &[1.0, 2.0]));
        assert_ne!(
            a,
            fingerprint(FNV_OFFSET, &[1.0, f32::from_bits(2.0f32.to_bits() + 1)])
        );
        assert_ne!(a, fingerprint(FNV_OFFSET, &[2.0, 1.0]));
    }
}
