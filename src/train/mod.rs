//! Training: one loop for every model, that never loses work.
//!
//! A model is a set of named variables in a candle [`VarMap`]; a [`TrainTask`] turns one batch
//! into a loss. The [`Trainer`] owns everything else: AdamW ([`optim`]), the EMA of the weights
//! ([`ema`]), the training generator, the step count, the metrics log ([`metrics`]) and the
//! checkpoints ([`checkpoint`]). One step reads
//!
//! ```text
//! loss = task.loss(step, rng)       a batch, noise and times drawn from the seeded generator
//! grads = backward(loss)
//! AdamW update (warm-up, clipping)  weights
//! EMA update                        averaged weights
//! metrics line                      step, loss, lr, grad_norm, elapsed_s
//! ```
//!
//! and the loop stops on the step or time budget or on an interrupt ([`interrupt`]: Ctrl-C or
//! SIGTERM finishes the current step, writes a checkpoint and returns). Checkpoints are written
//! every `checkpoint_every` steps, at the end and on interrupt, atomically as a whole.
//!
//! Determinism: the same seed and config give bitwise the same loss sequence, and a run resumed
//! from any checkpoint continues with exactly the losses the uninterrupted run would have had
//! (everything that influences the next step is in the checkpoint: weights, EMA, moments, step,
//! generator state, data-order state). `tests/train_resume.rs` checks this.
//!
//! Data-parallel training over K ranks (`mpirun -n K`) runs the same loop on every rank with
//! one gradient all-reduce per step ([`distributed`]); without a launcher nothing changes.

pub mod checkpoint;
pub mod distributed;
pub mod ema;
pub mod image;
pub mod init;
pub mod interrupt;
pub mod metrics;
pub mod optim;
pub mod toy;

use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::{Duration, Instant};

use candle_core::{DType, Tensor};
use candle_nn::VarMap;
use indicatif::{HumanDuration, ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{Error, Result};
use crate::rng::Rng;

pub use checkpoint::CheckpointState;
pub use distributed::{Collective, ExchangeStats, Shard};
pub use ema::{Ema, EmaConfig};
pub use interrupt::Interrupt;
pub use metrics::{EvalRecord, MetricRecord, MetricsLog};
pub use optim::{AdamW, AdamWConfig};

/// `metrics.jsonl` in the run directory.
pub const METRICS_FILE: &str = "metrics.jsonl";
/// The loss curve in the run directory.
pub const LOSS_CURVE_FILE: &str = "loss.png";
/// The resolved configuration, written when a run starts.
pub const CONFIG_FILE: &str = "config.json";

/// What a model and its data contribute to training.
pub trait TrainTask {
    /// The scalar loss of the batch for update number `step` (1-based), with a graph back to
    /// the model's variables. Every random draw comes from `rng` or from the task's own data
    /// order (saved through [`TrainTask::data_state`]).
    fn loss(&mut self, step: u64, rng: &mut Rng) -> Result<Tensor>;

    /// The data order's state, saved in checkpoints (opaque to the trainer).
    fn data_state(&self) -> Value;

    /// Restores a state returned by [`TrainTask::data_state`].
    fn restore_data_state(&mut self, state: &Value) -> Result<()>;

    /// Data-parallel training: from now on [`TrainTask::loss`] computes `shard`'s part of each
    /// global batch, drawing for each sample what the single process draws for it, and returns
    /// that part's contribution to the global mean loss (its own mean times `1 / shard.size`),
    /// so that the sum over ranks is the single-process loss and gradient. Refuses a shard it
    /// cannot take (a batch that does not split evenly). The default trains in one process only.
    fn set_shard(&mut self, shard: Shard) -> Result<()> {
        if shard.size > 1 {
            return Err(Error::param(
                "ranks",
                format!(
                    "this model trains in one process; it was started as {} ranks",
                    shard.size
                ),
            ));
        }
        Ok(())
    }

    /// Called every `hook_every` steps and when the run stops (e.g. to draw a sample grid).
    /// It must not change the weights or draw from the training generator.
    fn hook(&mut self, _ctx: &HookContext<'_>) -> Result<()> {
        Ok(())
    }

    /// Measures sample quality (`train --fid-every`): called every `eval_every` steps and at
    /// the last step of a step budget; the figure goes into that step's metrics line. Like
    /// [`TrainTask::hook`] it must not change the weights or draw from the training generator.
    fn evaluate(&mut self, _ctx: &HookContext<'_>) -> Result<Option<EvalRecord>> {
        Ok(None)
    }
}

/// What a [`TrainTask::hook`] sees.
pub struct HookContext<'a> {
    /// Updates done.
    pub step: u64,
    /// The run directory.
    pub run_dir: &'a Path,
    /// The model's variables (current weights).
    pub varmap: &'a VarMap,
    /// The EMA of the weights.
    pub ema: &'a Ema,
    /// The metrics so far.
    pub metrics: &'a [MetricRecord],
}

/// The trainer's own settings (saved and compared on resume, with the task's config).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainerConfig {
    /// Seeds the training generator (noise and times).
    pub seed: u64,
    /// AdamW settings.
    pub optimizer: AdamWConfig,
    /// EMA settings.
    pub ema: EmaConfig,
}

/// When to stop: after the run reaches `steps` updates in total, or after `minutes` of this
/// session, whichever comes first. At least one must be set.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Budget {
    /// Total updates of the run (a resumed run counts the updates before the checkpoint).
    pub steps: Option<u64>,
    /// Wall-clock minutes of this session.
    pub minutes: Option<f64>,
}

/// How the loop reports and saves.
#[derive(Clone, Debug, PartialEq)]
pub struct LoopOptions {
    /// Write a checkpoint every this many steps (0: only at the end and on interrupt).
    pub checkpoint_every: u64,
    /// Call [`TrainTask::hook`] every this many steps (0: only at the end).
    pub hook_every: u64,
    /// Call [`TrainTask::evaluate`] every this many steps, and at the last step of a step budget
    /// of at least this many steps (0: never). One process only (data-parallel runs do not
    /// evaluate).
    pub eval_every: u64,
    /// Draw a progress bar on stderr (hidden anyway when stderr is not a terminal).
    pub progress: bool,
}

impl Default for LoopOptions {
    fn default() -> Self {
        LoopOptions {
            checkpoint_every: crate::config::defaults::CHECKPOINT_EVERY,
            hook_every: 0,
            eval_every: 0,
            progress: true,
        }
    }
}

/// Why [`Trainer::run`] returned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// The run reached `Budget::steps`.
    Steps,
    /// The session used `Budget::minutes`.
    Time,
    /// An interrupt was requested.
    Interrupted,
}

/// The result of [`Trainer::run`].
#[derive(Clone, Debug, PartialEq)]
pub struct TrainOutcome {
    /// Updates done in total.
    pub step: u64,
    /// Updates done in this session.
    pub session_steps: u64,
    /// Wall-clock seconds of this session.
    pub session_seconds: f64,
    /// Why the loop stopped.
    pub stop: StopReason,
    /// The last metrics record.
    pub last: Option<MetricRecord>,
    /// The checkpoint directory written at the end.
    pub checkpoint: PathBuf,
    /// Data-parallel runs: what the gradient all-reduce cost (`None` in one process).
    pub exchange: Option<ExchangeStats>,
}

/// A training run in a directory: optimizer, EMA, generator, step, metrics and checkpoints.
pub struct Trainer {
    run_dir: PathBuf,
    full_config: Value,
    varmap: VarMap,
    optimizer: AdamW,
    ema: Ema,
    rng: Rng,
    step: u64,
    elapsed_before: f64,
    metrics: MetricsLog,
    last_checkpoint_step: Option<u64>,
    /// The ranks of a data-parallel run ([`distributed::SingleProcess`] by default).
    comm: Rc<dyn Collective>,
}

impl Trainer {
    /// The configuration saved in checkpoints: `{"trainer": config, "task": task_config}`.
    pub fn full_config(config: &TrainerConfig, task_config: &Value) -> Result<Value> {
        let trainer = serde_json::to_value(config)
            .map_err(|e| Error::Numerical(format!("cannot encode the trainer config: {e}")))?;
        Ok(serde_json::json!({ "trainer": trainer, "task": task_config }))
    }

    /// A fresh run in `run_dir` over the variables of `varmap` (already initialised). Refuses a
    /// directory that already holds a checkpoint (resume it or pick another directory).
    pub fn new(run_dir: &Path, varmap: &VarMap, config: &TrainerConfig, task_config: &Value) -> Result<Self> {
        Self::new_on(
            run_dir,
            varmap,
            config,
            task_config,
            distributed::single_process(),
        )
    }

    /// [`Trainer::new`] as one rank of `comm`: only rank 0 writes into `run_dir`.
    pub fn new_on(
        run_dir: &Path,
        varmap: &VarMap,
        config: &TrainerConfig,
        task_config: &Value,
        comm: Rc<dyn Collective>,
    ) -> Result<Self> {
        // any checkpoint, complete or damaged, is kept: a fresh run never overwrites one
        if let Some(found) = checkpoint::present(run_dir) {
            let step = checkpoint::read_state(&found)
                .map(|s| format!(" (step {})", s.step))
                .unwrap_or_default();
            return Err(Error::bad_input(
                run_dir,
                format!("already holds a checkpoint{step}; resume it or choose another output directory"),
            ));
        }
        let full_config = Self::full_config(config, task_config)?;
        let metrics = if comm.rank() == 0 {
            std::fs::create_dir_all(run_dir).map_err(|e| Error::io(run_dir, e))?;
            crate::io::write_json(&run_dir.join(CONFIG_FILE), &full_config)?;
            MetricsLog::create(&run_dir.join(METRICS_FILE))?
        } else {
            MetricsLog::in_memory(&run_dir.join(METRICS_FILE), Vec::new())
        };
        Ok(Trainer {
            run_dir: run_dir.to_path_buf(),
            full_config,
            varmap: varmap.clone(),
            optimizer: AdamW::new(varmap, config.optimizer.clone())?,
            ema: Ema::new(varmap, config.ema.clone())?,
            rng: Rng::new(config.seed),
            step: 0,
            elapsed_before: 0.0,
            metrics,
            last_checkpoint_step: None,
            comm,
        })
    }

    /// Resumes the run in `run_dir` from its newest complete checkpoint: restores the weights
    /// into `varmap`, the EMA, the optimizer moments and step, the generator and (through
    /// `task`) the data order, and cuts `metrics.jsonl` back to the checkpoint's step. The
    /// configuration must equal the checkpoint's; otherwise the error names each differing field.
    pub fn resume(
        run_dir: &Path,
        varmap: &VarMap,
        config: &TrainerConfig,
        task_config: &Value,
        task: &mut dyn TrainTask,
    ) -> Result<Self> {
        Self::resume_on(
            run_dir,
            varmap,
            config,
            task_config,
            task,
            distributed::single_process(),
        )
    }

    /// [`Trainer::resume`] as one rank of `comm`: every rank reads the checkpoint, only rank 0
    /// rewrites `metrics.jsonl`.
    pub fn resume_on(
        run_dir: &Path,
        varmap: &VarMap,
        config: &TrainerConfig,
        task_config: &Value,
        task: &mut dyn TrainTask,
        comm: Rc<dyn Collective>,
    ) -> Result<Self> {
        let ckpt = checkpoint::locate(run_dir)?;
        let state = checkpoint::read_state(&ckpt)?;
        let full_config = Self::full_config(config, task_config)?;
        checkpoint::check_config(&state.config, &full_config, &ckpt)?;

        let device = varmap
            .all_vars()
            .first()
            .map(|v| v.as_tensor().device().clone())
            .ok_or_else(|| Error::param("model", "has no parameters"))?;
        let model = checkpoint::read_checkpoint_tensors(&ckpt, checkpoint::MODEL_FILE, &device)?;
        checkpoint::load_vars(varmap, &model, &ckpt.join(checkpoint::MODEL_FILE))?;
        let mut optimizer = AdamW::new(varmap, config.optimizer.clone())?;
        let moments = checkpoint::read_f32_tensors(&ckpt, checkpoint::OPTIMIZER_FILE, &device)?;
        optimizer.load_state(&moments, state.step, &ckpt.join(checkpoint::OPTIMIZER_FILE))?;
        let mut ema = Ema::new(varmap, config.ema.clone())?;
        let averages = checkpoint::read_f32_tensors(&ckpt, checkpoint::EMA_FILE, &device)?;
        ema.load_state(&averages, state.ema_updates, &ckpt.join(checkpoint::EMA_FILE))?;
        task.restore_data_state(&state.data_state).map_err(|e| match e {
            Error::InvalidParameter { name, message } => Error::bad_input(
                ckpt.join(checkpoint::STATE_FILE),
                format!("data_state: {name}: {message}"),
            ),
            other => other,
        })?;
        let metrics = if comm.rank() == 0 {
            MetricsLog::resume(&run_dir.join(METRICS_FILE), state.step)?
        } else {
            MetricsLog::read(&run_dir.join(METRICS_FILE), state.step)?
        };
        Ok(Trainer {
            run_dir: run_dir.to_path_buf(),
            full_config,
            varmap: varmap.clone(),
            optimizer,
            ema,
            rng: state.rng,
            step: state.step,
            elapsed_before: state.elapsed_s,
            metrics,
            last_checkpoint_step: Some(state.step),
            comm,
        })
    }

    /// Updates done so far.
    pub fn step(&self) -> u64 {
        self.step
    }

    /// The EMA of the weights.
    pub fn ema(&self) -> &Ema {
        &self.ema
    }

    /// The optimizer.
    pub fn optimizer(&self) -> &AdamW {
        &self.optimizer
    }

    /// The metrics so far.
    pub fn metrics(&self) -> &[MetricRecord] {
        self.metrics.records()
    }

    /// The run directory.
    pub fn run_dir(&self) -> &Path {
        &self.run_dir
    }

    /// Writes a checkpoint of the current state (and fsyncs the metrics, redraws the loss curve).
    pub fn save_checkpoint(
        &mut self,
        task: &dyn TrainTask,
        session_start: Option<Instant>,
    ) -> Result<PathBuf> {
        let elapsed_s = self.elapsed_before + session_start.map_or(0.0, |s| s.elapsed().as_secs_f64());
        self.metrics.sync()?;
        let state = CheckpointState {
            format: checkpoint::FORMAT.into(),
            version: checkpoint::VERSION,
            step: self.step,
            elapsed_s,
            rng: self.rng.clone(),
            data_state: task.data_state(),
            config: self.full_config.clone(),
            ema_updates: self.ema.updates(),
            last_metrics: self.metrics.records().last().cloned(),
        };
        let model = named_vars(&self.varmap)?;
        let ema = self.ema.tensors();
        let optimizer = self.optimizer.state_tensors();
        let dir = checkpoint::save(
            &self.run_dir,
            &state,
            &checkpoint::CheckpointTensors {
                model: &model,
                ema: &ema,
                optimizer: &optimizer,
            },
        )?;
        metrics::loss_curve_png(&self.run_dir.join(LOSS_CURVE_FILE), self.metrics.records())?;
        self.last_checkpoint_step = Some(self.step);
        Ok(dir)
    }

    /// Trains until the budget is used or `interrupt` is triggered, then writes a checkpoint.
    pub fn run(
        &mut self,
        task: &mut dyn TrainTask,
        budget: &Budget,
        options: &LoopOptions,
        interrupt: &Interrupt,
    ) -> Result<TrainOutcome> {
        if self.comm.size() > 1 {
            return self.run_data_parallel(task, budget, options, interrupt);
        }
        check_budget(budget)?;
        let start = Instant::now();
        let time_limit = budget.minutes.map(|m| Duration::from_secs_f64(m * 60.0));
        let progress = Progress::new(options.progress, budget, self.step);
        let session_first = self.step;
        let stop = loop {
            if budget.steps.is_some_and(|n| self.step >= n) {
                break StopReason::Steps;
            }
            if time_limit.is_some_and(|l| start.elapsed() >= l) {
                break StopReason::Time;
            }
            let mut record = self.one_step(task, start)?;
            let eval_due = options.eval_every > 0
                && (self.step % options.eval_every == 0
                    || (budget.steps == Some(self.step) && self.step >= options.eval_every));
            if eval_due {
                progress.note(&format!("step {}: measuring samples", self.step));
                record.eval = self.call_evaluate(task)?;
            }
            self.metrics.append(record.clone())?;
            progress.update(
                &record,
                self.step - session_first,
                start.elapsed(),
                budget,
                self.metrics.records(),
            );
            if options.hook_every > 0 && self.step % options.hook_every == 0 {
                self.call_hook(task)?;
            }
            if interrupt.is_triggered() {
                break StopReason::Interrupted;
            }
            if options.checkpoint_every > 0 && self.step % options.checkpoint_every == 0 {
                self.save_checkpoint(task, Some(start))?;
            }
        };
        progress.finish();
        if options.hook_every == 0 || self.step % options.hook_every != 0 {
            self.call_hook(task)?;
        }
        let dir = if self.last_checkpoint_step == Some(self.step) {
            // nothing new since the last checkpoint; still refresh the picture and the log
            self.refresh_log()?;
            checkpoint::locate(&self.run_dir)?
        } else {
            self.save_checkpoint(task, Some(start))?
        };
        Ok(TrainOutcome {
            step: self.step,
            session_steps: self.step - session_first,
            session_seconds: start.elapsed().as_secs_f64(),
            stop,
            last: self.metrics.records().last().cloned(),
            checkpoint: dir,
            exchange: None,
        })
    }

    /// Syncs `metrics.jsonl` and redraws the loss curve.
    fn refresh_log(&mut self) -> Result<()> {
        self.metrics.sync()?;
        metrics::loss_curve_png(&self.run_dir.join(LOSS_CURVE_FILE), self.metrics.records())
    }

    /// The error of a non-finite loss at `step` (no update is applied).
    fn non_finite_loss(&self, loss_value: f64, step: u64) -> Error {
        Error::Numerical(format!(
            "the loss is {loss_value} at step {step}; {}",
            match self.last_checkpoint_step {
                Some(s) => format!(
                    "the checkpoint of step {s} in {} is intact",
                    self.run_dir.display()
                ),
                None => "no checkpoint was written yet".into(),
            }
        ))
    }

    fn one_step(&mut self, task: &mut dyn TrainTask, start: Instant) -> Result<MetricRecord> {
        let step = self.step + 1;
        let loss = task.loss(step, &mut self.rng)?;
        let loss_value = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        if !loss_value.is_finite() {
            return Err(self.non_finite_loss(loss_value, step));
        }
        let stats = self.optimizer.backward_step(&loss)?;
        self.ema.update()?;
        self.step = step;
        let record = MetricRecord {
            step,
            loss: loss_value,
            lr: stats.lr,
            grad_norm: stats.grad_norm,
            elapsed_s: self.elapsed_before + start.elapsed().as_secs_f64(),
            eval: None,
        };
        // appended by the caller, with the step's evaluation if one is due
        Ok(record)
    }

    fn call_evaluate(&mut self, task: &mut dyn TrainTask) -> Result<Option<EvalRecord>> {
        task.evaluate(&HookContext {
            step: self.step,
            run_dir: &self.run_dir,
            varmap: &self.varmap,
            ema: &self.ema,
            metrics: self.metrics.records(),
        })
    }

    fn call_hook(&mut self, task: &mut dyn TrainTask) -> Result<()> {
        task.hook(&HookContext {
            step: self.step,
            run_dir: &self.run_dir,
            varmap: &self.varmap,
            ema: &self.ema,
            metrics: self.metrics.records(),
        })
    }
}

/// A budget needs steps or minutes; minutes must be positive.
fn check_budget(budget: &Budget) -> Result<()> {
    if budget.steps.is_none() && budget.minutes.is_none() {
        return Err(Error::param("budget", "give a number of steps or of minutes"));
    }
    if let Some(m) = budget.minutes {
        crate::error::check_range("minutes", m, (0.0, false), (f64::INFINITY, false))?;
    }
    Ok(())
}

/// The variables of `varmap` as (name, tensor), in name order.
pub fn named_vars(varmap: &VarMap) -> Result<Vec<(String, Tensor)>> {
    let data = varmap
        .data()
        .lock()
        .map_err(|_| Error::Numerical("the VarMap's lock is poisoned".into()))?;
    let mut out: Vec<(String, Tensor)> = data
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().detach()))
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

/// The number of scalar parameters in `varmap`.
pub fn parameter_count(varmap: &VarMap) -> usize {
    varmap.all_vars().iter().map(|v| v.as_tensor().elem_count()).sum()
}

/// The progress bar: over steps when a step budget is set, else over the session's seconds.
/// When stderr is not a terminal (a log file, `nohup`) the bar cannot draw; the same figures
/// are then printed as a plain line every [`PLAIN_EVERY`].
struct Progress {
    bar: ProgressBar,
    by_steps: bool,
    /// Enabled but not drawable: print plain lines instead.
    plain: bool,
    /// Session seconds at the last plain line.
    last_plain: std::cell::Cell<f64>,
}

/// Interval of the plain progress lines.
const PLAIN_EVERY: Duration = Duration::from_secs(30);

impl Progress {
    fn new(enabled: bool, budget: &Budget, step: u64) -> Self {
        let (len, by_steps) = match (budget.steps, budget.minutes) {
            (Some(n), _) => (n, true),
            (None, Some(m)) => ((m * 60.0).ceil() as u64, false),
            (None, None) => (0, true),
        };
        let bar = if enabled {
            ProgressBar::new(len)
        } else {
            ProgressBar::hidden()
        };
        let template = if by_steps {
            "[{elapsed_precise}] {bar:30.cyan/blue} step {pos}/{len} {msg}"
        } else {
            "[{elapsed_precise}] {bar:30.cyan/blue} {pos}/{len} s {msg}"
        };
        if let Ok(style) = ProgressStyle::with_template(template) {
            bar.set_style(style.progress_chars("=> "));
        }
        if by_steps {
            bar.set_position(step);
        }
        let plain = enabled && bar.is_hidden();
        Progress {
            bar,
            by_steps,
            plain,
            last_plain: std::cell::Cell::new(0.0),
        }
    }

    /// A message in the bar (or a plain line when the bar cannot draw).
    fn note(&self, msg: &str) {
        if self.plain {
            eprintln!("{msg}");
        } else {
            self.bar.set_message(format!("| {msg}"));
        }
    }

    fn update(
        &self,
        r: &MetricRecord,
        session_steps: u64,
        elapsed: Duration,
        budget: &Budget,
        records: &[MetricRecord],
    ) {
        let secs = elapsed.as_secs_f64().max(1e-9);
        let plain_due = self.plain && secs - self.last_plain.get() >= PLAIN_EVERY.as_secs_f64();
        if self.bar.is_hidden() && !plain_due {
            return;
        }
        let rate = session_steps as f64 / secs;
        // a short running mean of the loss reads better than the raw batch loss
        let tail = &records[records.len().saturating_sub(50)..];
        let mean = tail.iter().map(|r| r.loss).sum::<f64>() / tail.len().max(1) as f64;
        let mut eta = f64::INFINITY;
        if let Some(n) = budget.steps {
            eta = n.saturating_sub(r.step) as f64 / rate.max(1e-9);
        }
        if let Some(m) = budget.minutes {
            eta = eta.min((m * 60.0 - secs).max(0.0));
        }
        let eta = if eta.is_finite() {
            format!("{:#}", HumanDuration(Duration::from_secs_f64(eta)))
        } else {
            "?".into()
        };
        let step_part = if self.by_steps {
            String::new()
        } else {
            format!("step {} | ", r.step)
        };
        if plain_due {
            self.last_plain.set(secs);
            eprintln!(
                "[{}] step {} | loss {mean:.4} | {rate:.1} steps/s | ETA {eta}",
                HumanDuration(elapsed),
                r.step
            );
            return;
        }
        self.bar.set_message(format!(
            "| {step_part}loss {mean:.4} | {rate:.1} steps/s | ETA {eta}"
        ));
        if self.by_steps {
            self.bar.set_position(r.step);
        } else {
            self.bar.set_position(secs as u64);
        }
    }

    fn finish(&self) {
        self.bar.finish_and_clear();
    }
}
