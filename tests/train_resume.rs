//! "Nothing lost": a run that is interrupted (or killed) and resumed produces exactly the loss
//! sequence, weights, EMA and optimizer state of the run that was never stopped (field notes,
//! bug 10), and a resume under a different configuration is refused with the differing fields.
//!
//! The model is the toy MLP at a tiny size so each run takes well under a second.

use std::path::Path;

use candle_core::{Device, Tensor};
use serde_json::Value;

use diffuse::data::toy2d::{DataSpec, Points, Toy2d};
use diffuse::nets::mlp::MlpConfig;
use diffuse::rng::Rng;
use diffuse::train::checkpoint::{self, read_f32_tensors, read_state};
use diffuse::train::toy::{load_data, toy_config, LogSnrSampling, ToyRun, ToyTrainConfig};
use diffuse::train::{
    AdamWConfig, Budget, EmaConfig, HookContext, Interrupt, LoopOptions, MetricRecord, StopReason, TrainTask,
    TrainerConfig,
};

const TOTAL: u64 = 30;

fn configs() -> (Points, ToyTrainConfig, TrainerConfig) {
    let spec = DataSpec::Synthetic(Toy2d::EightGaussians);
    let points = load_data(&spec, 200, 7).unwrap();
    let model = MlpConfig {
        dim: 2,
        hidden: 16,
        layers: 2,
        embed_dim: 8,
        num_classes: None,
    };
    let task = toy_config(&spec, &points, model, 32, LogSnrSampling::default());
    let trainer = TrainerConfig {
        seed: 7,
        // warm-up and clipping both active within the 30 steps, so their state matters
        optimizer: AdamWConfig {
            lr: 3e-3,
            warmup_steps: 20,
            grad_clip: Some(0.5),
            weight_decay: 0.01,
            ..AdamWConfig::default()
        },
        ema: EmaConfig {
            decay: 0.9,
            warmup: true,
        },
    };
    (points, task, trainer)
}

fn setup(dir: &Path, resume: bool) -> diffuse::Result<ToyRun> {
    let (points, task, trainer) = configs();
    ToyRun::setup(dir, &points, None, &task, &trainer, resume, &Device::Cpu)
}

fn options() -> LoopOptions {
    LoopOptions {
        checkpoint_every: 10,
        hook_every: 0,
        eval_every: 0,
        progress: false,
    }
}

fn steps(n: u64) -> Budget {
    Budget {
        steps: Some(n),
        minutes: None,
    }
}

/// The metrics file's records (loss, lr and grad_norm compared bitwise; elapsed time differs).
fn records(dir: &Path) -> Vec<(u64, u64, u64, u64)> {
    std::fs::read_to_string(dir.join(diffuse::train::METRICS_FILE))
        .unwrap()
        .lines()
        .map(|l| {
            let r: MetricRecord = serde_json::from_str(l).unwrap();
            (r.step, r.loss.to_bits(), r.lr.to_bits(), r.grad_norm.to_bits())
        })
        .collect()
}

fn tensors_bits(dir: &Path, file: &str) -> Vec<(String, Vec<u32>)> {
    let ckpt = checkpoint::locate(dir).unwrap();
    let mut t: Vec<(String, Tensor)> = read_f32_tensors(&ckpt, file, &Device::Cpu)
        .unwrap()
        .into_iter()
        .collect();
    t.sort_by(|a, b| a.0.cmp(&b.0));
    t.into_iter()
        .map(|(n, t)| {
            let bits = t
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
                .iter()
                .map(|v| v.to_bits())
                .collect();
            (n, bits)
        })
        .collect()
}

fn assert_same_run(a: &Path, b: &Path) {
    let (ra, rb) = (records(a), records(b));
    assert_eq!(ra.len(), TOTAL as usize);
    assert_eq!(ra, rb, "loss / lr / grad-norm sequences differ");
    for f in [
        checkpoint::MODEL_FILE,
        checkpoint::EMA_FILE,
        checkpoint::OPTIMIZER_FILE,
    ] {
        assert_eq!(tensors_bits(a, f), tensors_bits(b, f), "{f} differs");
    }
    let (sa, sb) = (
        read_state(&checkpoint::locate(a).unwrap()).unwrap(),
        read_state(&checkpoint::locate(b).unwrap()).unwrap(),
    );
    assert_eq!(sa.step, TOTAL);
    assert_eq!(
        (sa.step, &sa.rng, &sa.data_state, sa.ema_updates),
        (sb.step, &sb.rng, &sb.data_state, sb.ema_updates)
    );
}

fn uninterrupted(dir: &Path) {
    let mut run = setup(dir, false).unwrap();
    let out = run.run(&steps(TOTAL), &options(), &Interrupt::new()).unwrap();
    assert_eq!((out.step, out.stop), (TOTAL, StopReason::Steps));
}

/// Wraps a task: triggers the interrupt flag during step `at` (as a Ctrl-C arriving mid-step
/// would), or fails at step `fail_at` (as a kill would: no checkpoint is written).
struct Faulty<'a> {
    inner: &'a mut dyn TrainTask,
    interrupt: Interrupt,
    at: Option<u64>,
    fail_at: Option<u64>,
    nan_at: Option<u64>,
    hooks: Vec<u64>,
}

impl TrainTask for Faulty<'_> {
    fn loss(&mut self, step: u64, rng: &mut Rng) -> diffuse::Result<Tensor> {
        if Some(step) == self.fail_at {
            return Err(diffuse::Error::Numerical("simulated kill".into()));
        }
        if Some(step) == self.at {
            self.interrupt.trigger();
        }
        let loss = self.inner.loss(step, rng)?;
        if Some(step) == self.nan_at {
            return Ok((loss * f64::NAN)?);
        }
        Ok(loss)
    }
    fn data_state(&self) -> Value {
        self.inner.data_state()
    }
    fn restore_data_state(&mut self, state: &Value) -> diffuse::Result<()> {
        self.inner.restore_data_state(state)
    }
    fn hook(&mut self, ctx: &HookContext<'_>) -> diffuse::Result<()> {
        self.hooks.push(ctx.step);
        Ok(())
    }
}

#[test]
fn interrupted_and_resumed_run_equals_the_uninterrupted_run() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    uninterrupted(&a);

    // B: the interrupt arrives during step 13; the loop finishes it, checkpoints and returns
    let mut run = setup(&b, false).unwrap();
    let interrupt = Interrupt::new();
    let mut faulty = Faulty {
        inner: &mut run.task,
        interrupt: interrupt.clone(),
        at: Some(13),
        fail_at: None,
        nan_at: None,
        hooks: vec![],
    };
    let out = run
        .trainer
        .run(&mut faulty, &steps(TOTAL), &options(), &interrupt)
        .unwrap();
    assert_eq!((out.step, out.stop), (13, StopReason::Interrupted));
    assert_eq!(read_state(&checkpoint::locate(&b).unwrap()).unwrap().step, 13);
    assert_eq!(records(&b).len(), 13);
    drop(run);

    // a fresh process: rebuild the model from scratch (new random init) and resume
    let mut run = setup(&b, true).unwrap();
    assert_eq!(run.trainer.step(), 13);
    let out = run.run(&steps(TOTAL), &options(), &Interrupt::new()).unwrap();
    assert_eq!(
        (out.step, out.session_steps, out.stop),
        (TOTAL, TOTAL - 13, StopReason::Steps)
    );
    assert_same_run(&a, &b);
}

#[test]
fn a_kill_between_checkpoints_loses_only_the_steps_since_the_last_one() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, c) = (tmp.path().join("a"), tmp.path().join("c"));
    uninterrupted(&a);

    // C: dies at step 18, after the checkpoint of step 10 and 7 logged steps
    let mut run = setup(&c, false).unwrap();
    let interrupt = Interrupt::new();
    let mut faulty = Faulty {
        inner: &mut run.task,
        interrupt: interrupt.clone(),
        at: None,
        fail_at: Some(18),
        nan_at: None,
        hooks: vec![],
    };
    let err = run
        .trainer
        .run(&mut faulty, &steps(TOTAL), &options(), &interrupt)
        .unwrap_err();
    assert!(err.to_string().contains("simulated kill"));
    drop(run);
    assert_eq!(read_state(&checkpoint::locate(&c).unwrap()).unwrap().step, 10);
    assert_eq!(records(&c).len(), 17);

    let mut run = setup(&c, true).unwrap();
    assert_eq!(run.trainer.step(), 10);
    assert_eq!(
        run.trainer.metrics().len(),
        10,
        "the log is cut back to the checkpoint"
    );
    run.run(&steps(TOTAL), &options(), &Interrupt::new()).unwrap();
    assert_same_run(&a, &c);
}

#[test]
fn resume_in_two_hops_with_hooks() {
    // stop on the step budget at 10 (a checkpoint step), then at 25, then finish: same run
    let tmp = tempfile::tempdir().unwrap();
    let (a, d) = (tmp.path().join("a"), tmp.path().join("d"));
    uninterrupted(&a);
    for (resume, until) in [(false, 10), (true, 25), (true, TOTAL)] {
        let mut run = setup(&d, resume).unwrap();
        let interrupt = Interrupt::new();
        let mut task = Faulty {
            inner: &mut run.task,
            interrupt: interrupt.clone(),
            at: None,
            fail_at: None,
            nan_at: None,
            hooks: vec![],
        };
        let opts = LoopOptions {
            hook_every: 4,
            ..options()
        };
        run.trainer
            .run(&mut task, &steps(until), &opts, &interrupt)
            .unwrap();
        if until == 25 {
            // every 4th step of the session, plus once at the end
            assert_eq!(task.hooks, vec![12, 16, 20, 24, 25]);
        }
    }
    assert_same_run(&a, &d);
    // resuming a finished run with the same budget does nothing and keeps everything
    let mut run = setup(&d, true).unwrap();
    let out = run.run(&steps(TOTAL), &options(), &Interrupt::new()).unwrap();
    assert_eq!(out.session_steps, 0);
    assert_same_run(&a, &d);
}

#[test]
fn configuration_mismatch_and_existing_checkpoint_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let a = tmp.path().join("a");
    uninterrupted(&a);

    // a fresh run into a directory holding a checkpoint
    let e = setup(&a, false).err().unwrap();
    assert!(e.is_user_error());
    assert!(
        e.to_string().contains("already holds a checkpoint (step 30)"),
        "{e}"
    );

    // resume with a different learning rate and width: both fields are named
    let (points, mut task, mut trainer) = configs();
    trainer.optimizer.lr = 1e-2;
    task.model.hidden = 32;
    let e = ToyRun::setup(&a, &points, None, &task, &trainer, true, &Device::Cpu)
        .err()
        .unwrap();
    let msg = e.to_string();
    assert!(e.is_user_error());
    assert!(
        msg.contains("trainer.optimizer.lr: checkpoint 0.003, now 0.01"),
        "{msg}"
    );
    assert!(msg.contains("task.model.hidden: checkpoint 16, now 32"), "{msg}");

    // resume where there is nothing to resume
    let e = setup(&tmp.path().join("none"), true).err().unwrap();
    assert!(e.is_user_error(), "{e}");
}

#[test]
fn same_seed_same_losses_other_seed_other_losses_and_time_budget() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b, c) = (tmp.path().join("a"), tmp.path().join("b"), tmp.path().join("c"));
    uninterrupted(&a);
    uninterrupted(&b);
    assert_eq!(records(&a), records(&b));
    let (points, task, mut trainer) = configs();
    trainer.seed = 8;
    let mut run = ToyRun::setup(&c, &points, None, &task, &trainer, false, &Device::Cpu).unwrap();
    run.run(&steps(5), &options(), &Interrupt::new()).unwrap();
    assert_ne!(records(&a)[..5], records(&c)[..5]);

    // a time budget stops the loop and still checkpoints
    let d = tmp.path().join("d");
    let mut run = setup(&d, false).unwrap();
    let budget = Budget {
        steps: None,
        minutes: Some(0.2 / 60.0),
    };
    let out = run.run(&budget, &options(), &Interrupt::new()).unwrap();
    assert_eq!(out.stop, StopReason::Time);
    assert!(out.step >= 1);
    assert_eq!(
        read_state(&checkpoint::locate(&d).unwrap()).unwrap().step,
        out.step
    );
    assert!(d.join(diffuse::train::LOSS_CURVE_FILE).is_file());
}

#[test]
fn a_nan_loss_stops_the_run_and_keeps_the_last_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("nan");
    let mut run = setup(&dir, false).unwrap();
    let interrupt = Interrupt::new();
    let mut task = Faulty {
        inner: &mut run.task,
        interrupt: interrupt.clone(),
        at: None,
        fail_at: None,
        nan_at: Some(14),
        hooks: vec![],
    };
    let e = run
        .trainer
        .run(&mut task, &steps(TOTAL), &options(), &interrupt)
        .unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("the loss is NaN at step 14") && msg.contains("checkpoint of step 10"),
        "{msg}"
    );
    // the update of step 14 was not applied and the checkpoint of step 10 is untouched
    assert_eq!(run.trainer.step(), 13);
    assert_eq!(read_state(&checkpoint::locate(&dir).unwrap()).unwrap().step, 10);
}

/// Found by the fuzzer: the sizes recorded in a checkpoint's state.json drove allocations the
/// files could not justify (config.task.model.hidden = 10^9 asked for 4 * 10^18 bytes when the
/// model was loaded; config.task.n_data = 10^12 points when the training points were
/// regenerated). Both are now errors naming the file, before anything is allocated.
#[test]
fn sizes_in_a_damaged_state_json_are_checked_before_allocating() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("run");
    let mut run = setup(&dir, false).unwrap();
    run.run(&steps(2), &options(), &Interrupt::new()).unwrap();
    let ckpt = dir.join("checkpoint");
    // a checkpoint from before manifests, so the edited state.json is read as it is
    std::fs::remove_file(ckpt.join(checkpoint::MANIFEST_FILE)).unwrap();
    let state_path = ckpt.join(checkpoint::STATE_FILE);
    let original: Value = serde_json::from_str(&std::fs::read_to_string(&state_path).unwrap()).unwrap();
    let edit = |pointer: &str, v: Value| {
        let mut s = original.clone();
        *s.pointer_mut(pointer).unwrap() = v;
        std::fs::write(&state_path, serde_json::to_string(&s).unwrap()).unwrap();
    };
    edit("/config/task/model/hidden", serde_json::json!(1_000_000_000u64));
    let e = diffuse::nets::mlp::MlpDenoiser::load(&dir, true).err().unwrap();
    assert!(e.is_user_error());
    let msg = e.to_string();
    assert!(
        msg.contains("ema.safetensors") && msg.contains("state.json") && msg.contains("parameters"),
        "{msg}"
    );
    edit("/config/task/n_data", serde_json::json!(1_000_000_000_000u64));
    let e = diffuse::train::toy::training_points(&dir).unwrap_err();
    assert!(
        e.to_string().contains("state.json") && e.to_string().contains("n_data"),
        "{e}"
    );
    std::fs::write(&state_path, serde_json::to_string(&original).unwrap()).unwrap();
    assert!(diffuse::nets::mlp::MlpDenoiser::load(&dir, true).is_ok());
}
