//! Data-parallel training without MPI: K ranks as K threads of this test, joined by an
//! in-process [`Collective`] (sums in rank order, as MPI's sum of two operands is exact in
//! either order), check the trainer's side of `diffuse::train::distributed`:
//!
//! - K-independence: 2 and 4 ranks reproduce the single process's loss sequence and weights on
//!   a tiny U-Net that uses every random draw of a step (flips, t, eps, label dropout, dropout
//!   masks in the fused ResNet block). Tolerance: the ranks sum K partial gradients where the
//!   single process sums one batch, so the results differ by reduction order only: measured
//!   1.3e-7 relative on the losses and 1.4e-6 relative L2 on the weights over 12 steps,
//!   asserted 1e-5 (see `assert_close`; a sample drawn from the wrong stream, e.g. the local
//!   instead of the global index, moves the loss by more than 1e-2).
//! - faults: a rank whose step fails stops every rank after the same step, the lowest failing
//!   rank reports (naming itself and the intact checkpoint), the others get `PeerFailed`; the
//!   run resumes at the same K to exactly the uninterrupted run.
//! - an interrupt seen by one rank stops every rank after the same step with one checkpoint,
//!   and a checkpoint written by 2 ranks resumes in 1 process; so does a `--minutes` budget
//!   (the ranks' clocks are agreed on in the step's all-reduce).
//! - a batch the ranks cannot share, and (without the `mpi` feature) a launch of K ranks, are
//!   refused.
//!
//! The MPI transport itself, through `mpirun` and the CLI, is `tests/mpi_train.rs`.

use std::path::Path;
use std::rc::Rc;
use std::sync::{Arc, Barrier, Mutex};

use candle_core::{Device, Tensor};
use serde_json::Value;

use diffuse::data::{self, DataSpec, Split};
use diffuse::denoiser::Prediction;
use diffuse::nets::config::{DownBlockType, ResampleType, TimeScaleShift, UNetConfig, UpBlockType};
use diffuse::rng::Rng;
use diffuse::schedule::BetaSchedule;
use diffuse::train::checkpoint::{self, read_f32_tensors, read_state};
use diffuse::train::image::{checksum_f32, GridSampling, ImageRun, ImageTrainConfig};
use diffuse::train::{
    AdamWConfig, Budget, Collective, EmaConfig, HookContext, Interrupt, LoopOptions, MetricRecord, Shard,
    StopReason, TrainOutcome, TrainTask, TrainerConfig,
};

const STEPS: u64 = 12;

/// K ranks in one process: each rank deposits its buffer, then every rank combines them.
struct Shared {
    barrier: Barrier,
    floats: Mutex<Vec<Vec<f32>>>,
    words: Mutex<Vec<u64>>,
    bytes: Mutex<Vec<u8>>,
}

struct ThreadRank {
    rank: usize,
    size: usize,
    shared: Arc<Shared>,
}

impl ThreadRank {
    fn world(size: usize) -> Vec<ThreadRank> {
        let shared = Arc::new(Shared {
            barrier: Barrier::new(size),
            floats: Mutex::new(vec![Vec::new(); size]),
            words: Mutex::new(vec![0; size]),
            bytes: Mutex::new(Vec::new()),
        });
        (0..size)
            .map(|rank| ThreadRank {
                rank,
                size,
                shared: shared.clone(),
            })
            .collect()
    }
}

impl Collective for ThreadRank {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.size
    }
    fn name(&self) -> &'static str {
        "threads"
    }
    fn all_reduce_sum_f32(&self, buf: &mut [f32]) -> diffuse::Result<()> {
        self.shared.floats.lock().unwrap()[self.rank] = buf.to_vec();
        self.shared.barrier.wait();
        {
            let all = self.shared.floats.lock().unwrap();
            for (j, v) in buf.iter_mut().enumerate() {
                let mut acc = all[0][j];
                for part in &all[1..] {
                    acc += part[j];
                }
                *v = acc;
            }
        }
        self.shared.barrier.wait();
        Ok(())
    }
    fn broadcast_f32(&self, buf: &mut [f32], root: usize) -> diffuse::Result<()> {
        if self.rank == root {
            self.shared.floats.lock().unwrap()[root] = buf.to_vec();
        }
        self.shared.barrier.wait();
        if self.rank != root {
            buf.copy_from_slice(&self.shared.floats.lock().unwrap()[root]);
        }
        self.shared.barrier.wait();
        Ok(())
    }
    fn all_gather_u64(&self, value: u64) -> diffuse::Result<Vec<u64>> {
        self.shared.words.lock().unwrap()[self.rank] = value;
        self.shared.barrier.wait();
        let out = self.shared.words.lock().unwrap().clone();
        self.shared.barrier.wait();
        Ok(out)
    }
    fn broadcast_bytes(&self, bytes: &mut Vec<u8>, root: usize) -> diffuse::Result<()> {
        if self.rank == root {
            *self.shared.bytes.lock().unwrap() = bytes.clone();
        }
        self.shared.barrier.wait();
        if self.rank != root {
            *bytes = self.shared.bytes.lock().unwrap().clone();
        }
        self.shared.barrier.wait();
        Ok(())
    }
}

/// A tiny class-conditional U-Net with attention, scale-shift, dropout 0.1; flips on.
fn configs() -> (DataSpec, ImageTrainConfig, TrainerConfig) {
    let spec = DataSpec {
        data: "mnist5k".into(),
        format: None,
        split: Split::Test,
        image_size: Some(8),
        channels: None,
    };
    let ds = data::load(&spec).unwrap();
    let unet = UNetConfig {
        block_out_channels: vec![8, 16],
        down_block_types: vec![DownBlockType::DownBlock2D, DownBlockType::AttnDownBlock2D],
        up_block_types: vec![UpBlockType::AttnUpBlock2D, UpBlockType::UpBlock2D],
        layers_per_block: 1,
        norm_num_groups: 4,
        attention_head_dim: Some(8),
        resnet_time_scale_shift: TimeScaleShift::ScaleShift,
        downsample_type: ResampleType::Conv,
        upsample_type: ResampleType::Conv,
        dropout: 0.1,
        in_channels: 1,
        out_channels: 1,
        sample_size: Some([8, 8]),
        num_class_embeds: Some(11),
        null_class: Some(10),
        ..UNetConfig::default()
    };
    let config = ImageTrainConfig {
        n_images: ds.len(),
        data_checksum: checksum_f32(ds.pixels()),
        data: spec.clone(),
        preset: "tiny".into(),
        unet: unet.to_json(),
        schedule: BetaSchedule::from_name("linear").unwrap(),
        timesteps: 1000,
        prediction: Prediction::Eps,
        batch: 8,
        flip: true,
        cond_drop: Some(0.3),
    };
    let trainer = TrainerConfig {
        seed: 3,
        optimizer: AdamWConfig {
            warmup_steps: 3,
            // clipping active: it must see the summed gradient
            grad_clip: Some(0.5),
            weight_decay: 0.01,
            ..AdamWConfig::default()
        },
        ema: EmaConfig {
            decay: 0.9,
            warmup: true,
        },
    };
    (spec, config, trainer)
}

fn grid() -> GridSampling {
    GridSampling {
        n: 0,
        steps: 0,
        seed: 0,
        guidance_scale: 1.0,
    }
}

fn options() -> LoopOptions {
    LoopOptions {
        checkpoint_every: 5,
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

/// Wraps a task: fails during step `fail_at`, or triggers the interrupt during step `stop_at`.
struct Faulty<'a> {
    inner: &'a mut dyn TrainTask,
    interrupt: Interrupt,
    fail_at: Option<u64>,
    stop_at: Option<u64>,
}

impl TrainTask for Faulty<'_> {
    fn loss(&mut self, step: u64, rng: &mut Rng) -> diffuse::Result<Tensor> {
        if Some(step) == self.fail_at {
            return Err(diffuse::Error::Numerical("simulated failure".into()));
        }
        if Some(step) == self.stop_at {
            self.interrupt.trigger();
        }
        self.inner.loss(step, rng)
    }
    fn data_state(&self) -> Value {
        self.inner.data_state()
    }
    fn restore_data_state(&mut self, state: &Value) -> diffuse::Result<()> {
        self.inner.restore_data_state(state)
    }
    fn set_shard(&mut self, shard: Shard) -> diffuse::Result<()> {
        self.inner.set_shard(shard)
    }
    fn hook(&mut self, ctx: &HookContext<'_>) -> diffuse::Result<()> {
        self.inner.hook(ctx)
    }
}

/// What one rank did: its outcome and its final weights (name order).
type RankResult = (diffuse::Result<TrainOutcome>, Vec<(String, Vec<f32>)>);

/// One rank: set up (fresh or resumed), train to `until`, with a fault on `faulty_rank`.
fn rank_run(
    dir: &Path,
    comm: Rc<dyn Collective>,
    resume: bool,
    until: u64,
    fault: Option<(usize, Option<u64>, Option<u64>)>,
) -> RankResult {
    let (spec, config, trainer) = configs();
    let ds = data::load(&spec).unwrap();
    let rank = comm.rank();
    let mut run = ImageRun::setup_on(dir, ds, &config, &trainer, grid(), resume, &Device::Cpu, comm).unwrap();
    let interrupt = Interrupt::new();
    let (fail_at, stop_at) = match fault {
        Some((r, fail, stop)) if r == rank => (fail, stop),
        _ => (None, None),
    };
    let mut task = Faulty {
        inner: &mut run.task,
        interrupt: interrupt.clone(),
        fail_at,
        stop_at,
    };
    let out = run.trainer.run(&mut task, &steps(until), &options(), &interrupt);
    (out, weights(&run.varmap))
}

fn weights(varmap: &candle_nn::VarMap) -> Vec<(String, Vec<f32>)> {
    diffuse::train::named_vars(varmap)
        .unwrap()
        .into_iter()
        .map(|(n, t)| (n, t.flatten_all().unwrap().to_vec1::<f32>().unwrap()))
        .collect()
}

/// K ranks as threads over `dir`; results in rank order.
fn ranks(
    dir: &Path,
    k: usize,
    resume: bool,
    until: u64,
    fault: Option<(usize, Option<u64>, Option<u64>)>,
) -> Vec<RankResult> {
    std::thread::scope(|s| {
        let handles: Vec<_> = ThreadRank::world(k)
            .into_iter()
            .map(|c| s.spawn(move || rank_run(dir, Rc::new(c), resume, until, fault)))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// The single process (no collective at all: `ImageRun::setup`).
fn single(dir: &Path, resume: bool, until: u64) -> (TrainOutcome, Vec<(String, Vec<f32>)>) {
    let (spec, config, trainer) = configs();
    let ds = data::load(&spec).unwrap();
    let mut run = ImageRun::setup(dir, ds, &config, &trainer, grid(), resume, &Device::Cpu).unwrap();
    let out = run
        .trainer
        .run(&mut run.task, &steps(until), &options(), &Interrupt::new())
        .unwrap();
    (out, weights(&run.varmap))
}

fn records(dir: &Path) -> Vec<MetricRecord> {
    std::fs::read_to_string(dir.join(diffuse::train::METRICS_FILE))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// How far two runs are apart: the largest relative difference of their losses, the relative
/// L2 distance of their final weights `||a - b|| / ||a||`, and the largest absolute difference of
/// any weight.
fn differences(a: &Path, b: &Path, wa: &[(String, Vec<f32>)], wb: &[(String, Vec<f32>)]) -> (f64, f64, f64) {
    let (ra, rb) = (records(a), records(b));
    assert_eq!(ra.len(), rb.len());
    let loss = ra
        .iter()
        .zip(&rb)
        .map(|(x, y)| (x.loss - y.loss).abs() / x.loss.abs())
        .fold(0.0, f64::max);
    let (mut d2, mut n2, mut max_abs) = (0f64, 0f64, 0f64);
    for ((na, va), (nb, vb)) in wa.iter().zip(wb) {
        assert_eq!(na, nb);
        for (x, y) in va.iter().zip(vb) {
            let d = (x - y).abs() as f64;
            d2 += d * d;
            n2 += (*x as f64).powi(2);
            max_abs = max_abs.max(d);
        }
    }
    (loss, (d2 / n2).sqrt(), max_abs)
}

/// The tolerances (see the module docs): losses 1e-5 relative, weights 1e-5 in relative L2, and
/// 1e-4 for any single weight. The last is looser because a weight whose exact gradient is zero
/// (an attention key bias: adding it shifts every logit of a query equally) gets a gradient of
/// pure rounding noise, which AdamW turns into steps of up to lr: measured 1.4e-5 on
/// `to_k.bias` over 12 steps at lr 1e-3, every other weight within 1.3e-6.
fn assert_close(what: &str, (loss, weight, max_abs): (f64, f64, f64)) {
    eprintln!("{what}: losses {loss:e} relative, weights {weight:e} relative L2, {max_abs:e} at most");
    assert!(loss < 1e-5, "{what}: losses differ by {loss:e} relative");
    assert!(weight < 1e-5, "{what}: weights differ by {weight:e} relative L2");
    assert!(max_abs < 1e-4, "{what}: a weight differs by {max_abs:e}");
}

fn checkpoint_bits(dir: &Path, file: &str) -> Vec<(String, Vec<u32>)> {
    let ckpt = checkpoint::locate(dir).unwrap();
    let mut t: Vec<(String, Tensor)> = read_f32_tensors(&ckpt, file, &Device::Cpu)
        .unwrap()
        .into_iter()
        .collect();
    t.sort_by(|a, b| a.0.cmp(&b.0));
    t.into_iter()
        .map(|(n, t)| {
            let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            (n, v.iter().map(|x| x.to_bits()).collect())
        })
        .collect()
}

fn bits(records: &[MetricRecord]) -> Vec<(u64, u64, u64)> {
    records
        .iter()
        .map(|r| (r.step, r.loss.to_bits(), r.grad_norm.to_bits()))
        .collect()
}

#[test]
fn two_and_four_ranks_reproduce_one_process() {
    let tmp = tempfile::tempdir().unwrap();
    let one = tmp.path().join("one");
    let (out, w1) = single(&one, false, STEPS);
    assert_eq!(out.step, STEPS);
    assert!(out.exchange.is_none());
    for k in [2, 4] {
        let dir = tmp.path().join(format!("k{k}"));
        let results = ranks(&dir, k, false, STEPS, None);
        for (r, (out, w)) in results.iter().enumerate() {
            let out = out.as_ref().unwrap();
            assert_eq!((out.step, out.stop), (STEPS, StopReason::Steps), "rank {r}");
            // every rank applies the same update to the same buffer: bitwise the same weights
            assert_eq!(w, &results[0].1, "rank {r}'s weights differ from rank 0's");
            let x = out.exchange.as_ref().unwrap();
            assert_eq!((x.ranks, x.steps), (k, STEPS));
        }
        assert_close(
            &format!("{k} ranks vs 1 process over {STEPS} steps"),
            differences(&one, &dir, &w1, &results[0].1),
        );
        // the loss moved: the run trained
        let r = records(&dir);
        assert!((r[0].loss - r[STEPS as usize - 1].loss).abs() > 1e-3);
    }
}

#[test]
fn a_failing_rank_stops_every_rank_and_the_run_resumes_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    ranks(&a, 2, false, STEPS, None);
    // rank 1 fails during step 8, after the checkpoint of step 5
    let results = ranks(&b, 2, false, STEPS, Some((1, Some(8), None)));
    let e1 = results[1].0.as_ref().unwrap_err().to_string();
    assert!(
        e1.starts_with(
            "rank 1 of 2: numerical error: simulated failure; every rank stopped; the checkpoint of step 5"
        ) && e1.contains("is intact"),
        "{e1}"
    );
    match results[0].0.as_ref().unwrap_err() {
        diffuse::Error::PeerFailed {
            rank,
            size,
            user_error,
        } => assert_eq!((*rank, *size, *user_error), (1, 2, false)),
        e => panic!("rank 0: {e}"),
    }
    assert_eq!(read_state(&checkpoint::locate(&b).unwrap()).unwrap().step, 5);
    assert_eq!(
        records(&b).len(),
        7,
        "steps 1-7 were logged, step 8 was not applied"
    );
    // the same two ranks resume and finish: exactly the uninterrupted run
    let results = ranks(&b, 2, true, STEPS, None);
    assert!(results.iter().all(|r| r.0.is_ok()));
    assert_eq!(bits(&records(&a)), bits(&records(&b)));
    for f in [
        checkpoint::MODEL_FILE,
        checkpoint::EMA_FILE,
        checkpoint::OPTIMIZER_FILE,
    ] {
        assert_eq!(checkpoint_bits(&a, f), checkpoint_bits(&b, f), "{f} differs");
    }
}

#[test]
fn an_interrupt_on_one_rank_stops_all_after_the_same_step_and_resumes_in_one_process() {
    let tmp = tempfile::tempdir().unwrap();
    let (one, b) = (tmp.path().join("one"), tmp.path().join("b"));
    let (_, w1) = single(&one, false, STEPS);
    // rank 1 alone sees a stop request during step 7
    let results = ranks(&b, 2, false, STEPS, Some((1, None, Some(7))));
    for (r, (out, _)) in results.iter().enumerate() {
        let out = out.as_ref().unwrap();
        assert_eq!((out.step, out.stop), (7, StopReason::Interrupted), "rank {r}");
    }
    // one checkpoint, of the step every rank stopped after
    assert_eq!(read_state(&checkpoint::locate(&b).unwrap()).unwrap().step, 7);
    assert_eq!(records(&b).len(), 7);
    // the checkpoint does not depend on K: one process continues it
    let (out, w) = single(&b, true, STEPS);
    assert_eq!((out.step, out.session_steps), (STEPS, STEPS - 7));
    assert_close(
        "2 ranks to step 7, then 1 process",
        differences(&one, &b, &w1, &w),
    );
}

#[test]
fn a_time_budget_stops_every_rank_after_the_same_step() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("timed");
    let budget = Budget {
        steps: None,
        minutes: Some(0.3 / 60.0),
    };
    let outcomes: Vec<TrainOutcome> = std::thread::scope(|s| {
        let handles: Vec<_> = ThreadRank::world(2)
            .into_iter()
            .map(|c| {
                let dir = &dir;
                let budget = &budget;
                s.spawn(move || {
                    let (spec, config, trainer) = configs();
                    let ds = data::load(&spec).unwrap();
                    let mut run = ImageRun::setup_on(
                        dir,
                        ds,
                        &config,
                        &trainer,
                        grid(),
                        false,
                        &Device::Cpu,
                        Rc::new(c),
                    )
                    .unwrap();
                    run.trainer
                        .run(&mut run.task, budget, &options(), &Interrupt::new())
                        .unwrap()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(outcomes.iter().all(|o| o.stop == StopReason::Time));
    assert!(outcomes[0].step >= 1);
    assert_eq!(
        outcomes[0].step, outcomes[1].step,
        "the ranks stopped at different steps"
    );
    assert_eq!(
        read_state(&checkpoint::locate(&dir).unwrap()).unwrap().step,
        outcomes[0].step
    );
}

#[test]
fn a_batch_the_ranks_cannot_share_is_refused_before_anything_is_written() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("three");
    let (spec, config, trainer) = configs();
    let comm: Rc<dyn Collective> = Rc::new(ThreadRank::world(3).remove(0));
    let e = ImageRun::setup_on(
        &dir,
        data::load(&spec).unwrap(),
        &config,
        &trainer,
        grid(),
        false,
        &Device::Cpu,
        comm,
    )
    .err()
    .unwrap();
    assert!(e.is_user_error());
    assert!(
        e.to_string()
            .contains("the global batch 8 does not split evenly over 3 ranks"),
        "{e}"
    );
    assert!(!dir.exists());
}

/// Without the `mpi` feature a process started as one of K > 1 ranks (the environment every
/// MPI launcher sets) refuses to train K independent copies: rank 0 says why, the other ranks
/// exit with the same status silently.
#[cfg(not(feature = "mpi"))]
#[test]
fn without_the_mpi_feature_a_launch_of_several_ranks_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    for (rank, env) in [
        (0, [("OMPI_COMM_WORLD_SIZE", "2"), ("OMPI_COMM_WORLD_RANK", "0")]),
        (1, [("OMPI_COMM_WORLD_SIZE", "2"), ("OMPI_COMM_WORLD_RANK", "1")]),
        (0, [("PMI_SIZE", "4"), ("PMI_RANK", "0")]),
    ] {
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_diffuse"))
            .args(["train", "--out", out.to_str().unwrap(), "--steps", "1"])
            .envs(env)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{err}");
        if rank == 0 {
            assert_eq!(err.lines().count(), 1, "{err}");
            assert!(err.contains("without the `mpi` feature"), "{err}");
        } else {
            assert!(err.is_empty(), "{err}");
        }
        assert!(o.stdout.is_empty());
        assert!(!out.exists(), "nothing is written");
    }
}
