//! Image datasets, held in memory as f32 in [-1, 1], shape `[C, H, W]` per image.
//!
//! Sources: MNIST-style IDX files ([`idx`]), CIFAR-10 binary batches ([`cifar`]), image folders
//! ([`folder`]) and the bundled MNIST subset `mnist5k` (compiled into the binary). [`load`]
//! takes a [`DataSpec`] — the word `mnist5k` or a directory whose format is detected — and
//! returns a whole [`ImageDataset`] or an error naming the file and what was expected; nothing
//! is ever half-loaded. [`toy2d`] holds the 2-D toy distributions and point files. [`EpochSampler`] gives the seeded, resumable training order.
//!
//! Pixel scaling (Ho et al. 2020, sec. 4: "data scaled linearly to [-1, 1]"):
//!
//! ```text
//! x = v / 127.5 - 1        (v = 0..255; 0 -> -1, 255 -> 1)
//! ```

use std::fmt;
use std::path::Path;
use std::str::FromStr;

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::rng::Rng;

pub mod cifar;
pub mod folder;
pub mod idx;
pub mod resize;
pub mod sampler;
pub mod toy2d;

pub use sampler::{EpochSampler, SamplerState};

/// The name of the bundled dataset.
pub const BUNDLED: &str = "mnist5k";

/// Maps a byte `v` in 0..255 to `v / 127.5 - 1` in [-1, 1].
pub fn unit_from_u8(v: u8) -> f32 {
    v as f32 / 127.5 - 1.0
}

/// Converts one image's planes between channel counts:
///
/// ```text
/// 1 -> 3: R = G = B = Y
/// 3 -> 1: Y = 0.299 R + 0.587 G + 0.114 B      (ITU-R BT.601 luma, as Pillow's convert("L"))
/// ```
///
/// The conversion is linear, so it commutes with resizing.
pub fn convert_channels(planes: Vec<f32>, from: usize, to: usize) -> Result<Vec<f32>> {
    match (from, to) {
        (a, b) if a == b => Ok(planes),
        (1, 3) => Ok(planes.repeat(3)),
        (3, 1) => {
            let n = planes.len() / 3;
            let (r, gb) = planes.split_at(n);
            let (g, b) = gb.split_at(n);
            Ok(r.iter()
                .zip(g)
                .zip(b)
                .map(|((r, g), b)| 0.299 * r + 0.587 * g + 0.114 * b)
                .collect())
        }
        _ => Err(Error::param(
            "channels",
            format!("cannot convert {from} channels to {to}; expected 1 or 3"),
        )),
    }
}

/// Which part of a dataset.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    /// The training split (`train-*` IDX files, `data_batch_*.bin`, `train/`).
    #[default]
    Train,
    /// The test split (`t10k-*` IDX files, `test_batch.bin`, `test/`).
    Test,
}

impl fmt::Display for Split {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Split::Train => "train",
            Split::Test => "test",
        })
    }
}

impl FromStr for Split {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "train" => Ok(Split::Train),
            "test" => Ok(Split::Test),
            _ => Err(Error::param(
                "split",
                format!("got '{s}', expected train or test"),
            )),
        }
    }
}

/// A dataset's file format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// MNIST / Fashion-MNIST IDX files.
    Idx,
    /// CIFAR-10 binary batches.
    Cifar10,
    /// A folder of PNG / JPEG images.
    Folder,
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Format::Idx => "idx",
            Format::Cifar10 => "cifar10",
            Format::Folder => "folder",
        })
    }
}

impl FromStr for Format {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "idx" => Ok(Format::Idx),
            "cifar10" => Ok(Format::Cifar10),
            "folder" => Ok(Format::Folder),
            _ => Err(Error::param(
                "format",
                format!("got '{s}', expected idx, cifar10 or folder"),
            )),
        }
    }
}

/// What to load: the CLI's `--data`, `--format`, `--split`, `--image-size`, `--channels`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSpec {
    /// `mnist5k` (the bundled MNIST subset) or a directory.
    pub data: String,
    /// Overrides format detection.
    pub format: Option<Format>,
    /// Which split.
    pub split: Split,
    /// Resize (shorter side) and centre-crop every image to `image_size x image_size`.
    pub image_size: Option<usize>,
    /// Convert to 1 or 3 channels (default: the source's own).
    pub channels: Option<usize>,
}

impl Default for DataSpec {
    fn default() -> Self {
        DataSpec {
            data: BUNDLED.into(),
            format: None,
            split: Split::Train,
            image_size: None,
            channels: None,
        }
    }
}

impl DataSpec {
    /// The same spec for another split (e.g. the test split of a training run's data).
    pub fn with_split(&self, split: Split) -> Self {
        DataSpec {
            split,
            ..self.clone()
        }
    }
}

/// Images in memory: `len` images of `[C, H, W]` f32 in [-1, 1], stored contiguously, with
/// optional labels and class names and a description of where they came from.
#[derive(Clone, Debug, PartialEq)]
pub struct ImageDataset {
    pixels: Vec<f32>,
    shape: [usize; 3],
    labels: Option<Vec<u32>>,
    class_names: Option<Vec<String>>,
    source: String,
}

impl ImageDataset {
    /// A dataset from contiguous pixels (`len * C * H * W` values, image after image, each
    /// `[C, H, W]` row-major). Checks the sizes agree and that the images are not empty.
    pub fn new(
        pixels: Vec<f32>,
        shape: [usize; 3],
        labels: Option<Vec<u32>>,
        class_names: Option<Vec<String>>,
        source: String,
    ) -> Result<Self> {
        let per: usize = shape.iter().product();
        if per == 0 {
            return Err(Error::param(
                "image shape",
                format!("got {shape:?}, expected positive [C, H, W]"),
            ));
        }
        if pixels.is_empty() || pixels.len() % per != 0 {
            return Err(Error::param(
                "pixels",
                format!(
                    "{} values, expected a positive multiple of {per} (images of {shape:?})",
                    pixels.len()
                ),
            ));
        }
        let n = pixels.len() / per;
        if let Some(l) = &labels {
            if l.len() != n {
                return Err(Error::param(
                    "labels",
                    format!("{} labels for {n} images", l.len()),
                ));
            }
        }
        Ok(ImageDataset {
            pixels,
            shape,
            labels,
            class_names,
            source,
        })
    }

    /// The number of images.
    pub fn len(&self) -> usize {
        self.pixels.len() / self.image_len()
    }

    /// Always false: a dataset holds at least one image (checked on construction).
    pub fn is_empty(&self) -> bool {
        false
    }

    /// `[C, H, W]` of every image.
    pub fn shape(&self) -> [usize; 3] {
        self.shape
    }

    /// Values per image, `C * H * W`.
    pub fn image_len(&self) -> usize {
        self.shape.iter().product()
    }

    /// Image `i` as `[C, H, W]` row-major values, or `None` past the end.
    pub fn image(&self, i: usize) -> Option<&[f32]> {
        let per = self.image_len();
        self.pixels.get(i.checked_mul(per)?..(i + 1).checked_mul(per)?)
    }

    /// All pixels, image after image.
    pub fn pixels(&self) -> &[f32] {
        &self.pixels
    }

    /// One label per image, when the source has labels.
    pub fn labels(&self) -> Option<&[u32]> {
        self.labels.as_deref()
    }

    /// Class names indexed by label, when the source names them.
    pub fn class_names(&self) -> Option<&[String]> {
        self.class_names.as_deref()
    }

    /// Where the images came from (and how they were transformed).
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The images at `indices` as a CPU tensor `[B, C, H, W]` (f32); move it with
    /// `Tensor::to_device`. With `flip`, each image is mirrored left-right with probability
    /// 1/2, one draw per image in order (`rng.below(2) == 1` flips), so a seeded generator
    /// gives the same flips every run.
    pub fn batch(&self, indices: &[usize], mut flip: Option<&mut Rng>) -> Result<Tensor> {
        let [c, h, w] = self.shape;
        let mut data = Vec::with_capacity(indices.len() * self.image_len());
        for &i in indices {
            let image = self.image(i).ok_or_else(|| {
                Error::param(
                    "batch index",
                    format!("got {i}, expected an index below the dataset size {}", self.len()),
                )
            })?;
            let mirror = flip.as_deref_mut().is_some_and(|rng| rng.below(2) == 1);
            if mirror {
                for row in image.chunks_exact(w) {
                    data.extend(row.iter().rev());
                }
            } else {
                data.extend_from_slice(image);
            }
        }
        Ok(Tensor::from_vec(data, (indices.len(), c, h, w), &Device::Cpu)?)
    }

    /// The labels at `indices`, when the dataset has labels.
    pub fn batch_labels(&self, indices: &[usize]) -> Option<Vec<u32>> {
        let labels = self.labels.as_ref()?;
        indices.iter().map(|&i| labels.get(i).copied()).collect()
    }

    /// Every image resized (shorter side) and centre-cropped to `size x size`; see [`resize`].
    pub fn resized(self, size: usize) -> Result<Self> {
        let [c, h, w] = self.shape;
        if (h, w) == (size, size) {
            return Ok(self);
        }
        let mut pixels = Vec::with_capacity(self.len() * c * size * size);
        for image in self.pixels.chunks_exact(c * h * w) {
            pixels.extend(resize::resize_and_crop(image, c, h, w, size)?);
        }
        let source = format!("{}, resized to {size}x{size}", self.source);
        ImageDataset::new(pixels, [c, size, size], self.labels, self.class_names, source)
    }

    /// Every image converted to `channels` (1 or 3); see [`convert_channels`].
    pub fn with_channels(self, channels: usize) -> Result<Self> {
        let [c, h, w] = self.shape;
        if c == channels {
            return Ok(self);
        }
        let mut pixels = Vec::with_capacity(self.len() * channels * h * w);
        for image in self.pixels.chunks_exact(c * h * w) {
            pixels.extend(convert_channels(image.to_vec(), c, channels)?);
        }
        let source = format!("{}, converted to {channels} channels", self.source);
        ImageDataset::new(pixels, [channels, h, w], self.labels, self.class_names, source)
    }
}

/// The bundled MNIST subset (4,000 train / 1,000 test; see `data/mnist5k/PROVENANCE.md`),
/// compiled into the binary so it loads from any working directory.
mod bundled {
    pub const TRAIN_IMAGES: &[u8] = include_bytes!("../../data/mnist5k/train-images-idx3-ubyte.gz");
    pub const TRAIN_LABELS: &[u8] = include_bytes!("../../data/mnist5k/train-labels-idx1-ubyte.gz");
    pub const TEST_IMAGES: &[u8] = include_bytes!("../../data/mnist5k/t10k-images-idx3-ubyte.gz");
    pub const TEST_LABELS: &[u8] = include_bytes!("../../data/mnist5k/t10k-labels-idx1-ubyte.gz");
}

/// Loads a split of the bundled `mnist5k` (labels 0..9 with class names "0".."9").
pub fn load_bundled(split: Split) -> Result<ImageDataset> {
    let (images, labels, prefix) = match split {
        Split::Train => (bundled::TRAIN_IMAGES, bundled::TRAIN_LABELS, "train"),
        Split::Test => (bundled::TEST_IMAGES, bundled::TEST_LABELS, "t10k"),
    };
    let images_name = Path::new(BUNDLED).join(format!("{prefix}-images-idx3-ubyte.gz"));
    let labels_name = Path::new(BUNDLED).join(format!("{prefix}-labels-idx1-ubyte.gz"));
    let images = idx::parse_images(&idx::decompress(images.to_vec(), &images_name)?, &images_name)?;
    let labels = idx::parse_labels(&idx::decompress(labels.to_vec(), &labels_name)?, &labels_name)?;
    let ds = idx::to_dataset(
        images,
        Some((labels, &labels_name)),
        format!("{BUNDLED} (bundled MNIST subset), {split} split"),
    )?;
    Ok(ImageDataset {
        class_names: Some((0..10).map(|d| d.to_string()).collect()),
        ..ds
    })
}

/// The training data recorded in the `info.json` that `diffuse sample` writes beside its
/// samples (`"training_data"`: a [`DataSpec`], or null for a model without recorded data).
/// `Ok(None)` when the file does not exist or records no data; an error naming the file and the
/// field when it is not readable JSON, has an unknown field or a malformed one (never silently
/// other data; see [`crate::config::samples_info`]).
pub fn training_data_from_info(path: &Path) -> Result<Option<DataSpec>> {
    Ok(crate::config::samples_info::SamplesInfo::read(path)?.and_then(|i| i.training_data))
}

/// The format of a dataset directory: IDX when it holds IDX images files, CIFAR-10 when it
/// holds `data_batch_*.bin` / `test_batch.bin` (itself or in `cifar-10-batches-bin/`), else an
/// image folder.
pub fn detect(dir: &Path) -> Format {
    if idx::is_idx_dir(dir) {
        Format::Idx
    } else if cifar::batches_dir(dir).is_some() {
        Format::Cifar10
    } else {
        Format::Folder
    }
}

/// Loads the dataset a [`DataSpec`] describes (see the module docs). Errors name the file and
/// what was expected; on any error nothing is returned.
pub fn load(spec: &DataSpec) -> Result<ImageDataset> {
    if spec.image_size == Some(0) {
        return Err(Error::param(
            "image_size",
            "got 0, expected a positive number of pixels",
        ));
    }
    if let Some(c) = spec.channels {
        if c != 1 && c != 3 {
            return Err(Error::param("channels", format!("got {c}, expected 1 or 3")));
        }
    }
    let dataset = if spec.data == BUNDLED {
        if let Some(f) = spec.format.filter(|&f| f != Format::Idx) {
            return Err(Error::param(
                "format",
                format!("got {f}, but {BUNDLED} is the bundled IDX dataset (use ./{BUNDLED} for a directory of that name)"),
            ));
        }
        load_bundled(spec.split)?
    } else {
        let dir = Path::new(&spec.data);
        let expected = format!(
            "expected `{BUNDLED}` (the bundled MNIST subset) or a directory of IDX files, CIFAR-10 .bin batches or images"
        );
        if !dir.exists() {
            return Err(Error::bad_input(
                dir,
                format!("no such file or directory; {expected}"),
            ));
        }
        if !dir.is_dir() {
            return Err(Error::bad_input(dir, format!("not a directory; {expected}")));
        }
        match spec.format.unwrap_or_else(|| detect(dir)) {
            Format::Idx => idx::load_dir(dir, spec.split)?,
            Format::Cifar10 => cifar::load_dir(dir, spec.split)?,
            Format::Folder => folder::load_dir(dir, spec.split, spec.image_size, spec.channels)?,
        }
    };
    let dataset = match spec.image_size {
        Some(size) => dataset.resized(size)?,
        None => dataset,
    };
    match spec.channels {
        Some(c) => dataset.with_channels(c),
        None => Ok(dataset),
    }
}
