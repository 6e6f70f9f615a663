//! InceptionV3 exactly as pytorch-fid builds it for FID (Heusel et al. 2017; pytorch-fid's
//! `InceptionV3` over `fid_inception_v3()`): torchvision's Inception3 layers with the
//! TensorFlow-port patches of the FID network, read from a weights file in pytorch-fid's key
//! layout (`Conv2d_1a_3x3.conv.weight`, `Mixed_5b.branch1x1.bn.running_var`, ...).
//!
//! ```text
//! x in [0, 1], [N, 3, H, W] -> bilinear resize to 299 x 299 (align_corners = False) -> 2 x - 1
//! block 0: Conv2d_1a_3x3 (s 2) -> Conv2d_2a_3x3 -> Conv2d_2b_3x3 (p 1) -> max pool 3 s 2   (64)
//! block 1: Conv2d_3b_1x1 -> Conv2d_4a_3x3 -> max pool 3 s 2                                 (192)
//! block 2: Mixed_5b/5c/5d (FIDInceptionA) -> Mixed_6a (B) -> Mixed_6b..6e (FIDInceptionC)  (768)
//! block 3: Mixed_7a (D) -> Mixed_7b (FIDInceptionE_1) -> Mixed_7c (FIDInceptionE_2)        (2048)
//! features of `--dims d`: the output of d's block, averaged over its spatial positions
//! ```
//!
//! Every layer is `BasicConv2d`: `relu(batch_norm(conv(x)))`, no conv bias, BatchNorm eps 1e-3
//! (folded into the convolution here: `w' = w * gamma / sqrt(var + eps)`,
//! `b' = beta - mean * gamma / sqrt(var + eps)`). The FID-specific details: the pooling branch of
//! the A, C and E_1 blocks averages 3x3 windows with `count_include_pad = False` (a border
//! window divides by the number of real pixels, as TensorFlow does), and E_2's pooling branch
//! max-pools. Features are what pytorch-fid's `get_activations` returns: the block's output
//! average-pooled to 1x1.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor, D};

use crate::error::{Error, Result};

/// The side the network reads: inputs are resized to `SIZE x SIZE`.
pub const SIZE: usize = 299;

/// BatchNorm's epsilon in the FID network (torchvision's BasicConv2d).
pub const BN_EPS: f64 = 1e-3;

/// The feature widths `--dims` accepts, in block order (pytorch-fid's `BLOCK_INDEX_BY_DIM`).
pub const DIMS: [usize; 4] = [64, 192, 768, 2048];

/// What every output names as the feature network.
pub const NAME: &str = "InceptionV3 (pytorch-fid's FID network)";

/// The block whose output has `dims` features.
pub fn block_of_dims(dims: usize) -> Result<usize> {
    DIMS.iter().position(|&d| d == dims).ok_or_else(|| {
        Error::param(
            "dims",
            format!("{dims} is not one of 64, 192, 768, 2048 (pytorch-fid's blocks)"),
        )
    })
}

/// Where the network's tensors come from: `get(name, shape)` returns the f32 tensor of that
/// pytorch-fid key, or an error naming the source when it is missing or of another shape.
pub trait WeightSource {
    fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor>;
}

/// The tensors of a weights file: safetensors, or a PyTorch state dict in the current (zip)
/// `torch.save` format, with pytorch-fid's key names.
pub struct WeightFile {
    path: std::path::PathBuf,
    tensors: HashMap<String, Tensor>,
}

impl WeightFile {
    /// Reads `path` (`.safetensors`, or `.pth` / `.pt` / `.bin` as a PyTorch state dict).
    pub fn open(path: &Path) -> Result<Self> {
        if !path.is_file() {
            return Err(Error::bad_input(path, "no such weights file"));
        }
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .unwrap_or("")
            .to_ascii_lowercase();
        let tensors: HashMap<String, Tensor> = if ext == "safetensors" {
            candle_core::safetensors::load(path, &Device::Cpu).map_err(|e| {
                Error::bad_input(
                    path,
                    format!(
                        "not a readable safetensors file ({})",
                        crate::error::escape_controls(&e.to_string())
                    ),
                )
            })?
        } else {
            crate::pth::read_state_dict(path).map_err(|e| match e {
                Error::BadInput { message, .. } if message.starts_with("not a zip archive") => {
                    Error::bad_input(
                        path,
                        format!(
                            "{message}; pytorch-fid's published pt_inception-2015-12-05-6726825d.pth is \
                         in PyTorch's legacy format: convert it once with \
                         `python3 tools/convert_fid_inception.py IN.pth OUT.safetensors`"
                        ),
                    )
                }
                e => e,
            })?
        };
        if tensors.is_empty() {
            return Err(Error::bad_input(path, "holds no tensors"));
        }
        Ok(WeightFile {
            path: path.to_path_buf(),
            tensors,
        })
    }

    /// The tensors of a file already read (`path` is only named in errors).
    pub fn from_tensors(path: &Path, tensors: HashMap<String, Tensor>) -> Self {
        WeightFile {
            path: path.to_path_buf(),
            tensors,
        }
    }
}

impl WeightSource for WeightFile {
    fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let t = self.tensors.get(name).ok_or_else(|| {
            Error::bad_input(
                &self.path,
                format!("no tensor `{name}`: not pytorch-fid's InceptionV3 (its key layout, e.g. `Mixed_5b.branch1x1.conv.weight`)"),
            )
        })?;
        if t.dims() != shape {
            return Err(Error::bad_input(
                &self.path,
                format!(
                    "tensor `{name}` has shape {:?}, pytorch-fid's InceptionV3 has {shape:?} (another architecture?)",
                    t.dims()
                ),
            ));
        }
        let t = t.to_dtype(DType::F32)?;
        if let Some(i) = t
            .flatten_all()?
            .to_vec1::<f32>()?
            .iter()
            .position(|v| !v.is_finite())
        {
            return Err(Error::bad_input(
                &self.path,
                format!("tensor `{name}` value {i} is not finite"),
            ));
        }
        Ok(t)
    }
}

/// `relu(batch_norm(conv(x)))` with the BatchNorm folded into the convolution.
struct BasicConv {
    w: Tensor,
    b: Tensor,
    stride: usize,
    pad: (usize, usize),
    square: bool,
}

impl BasicConv {
    fn load(
        src: &dyn WeightSource,
        name: &str,
        c_in: usize,
        c_out: usize,
        k: (usize, usize),
        stride: usize,
        pad: (usize, usize),
    ) -> Result<Self> {
        let w = src.get(&format!("{name}.conv.weight"), &[c_out, c_in, k.0, k.1])?;
        let bn = |p: &str| src.get(&format!("{name}.bn.{p}"), &[c_out]);
        let (gamma, beta, mean, var) = (
            bn("weight")?,
            bn("bias")?,
            bn("running_mean")?,
            bn("running_var")?,
        );
        let scale = gamma.div(&(var + BN_EPS)?.sqrt()?)?;
        let w = w.broadcast_mul(&scale.reshape((c_out, 1, 1, 1))?)?;
        let b = beta.sub(&mean.mul(&scale)?)?;
        Ok(BasicConv {
            w,
            b,
            stride,
            pad,
            square: k.0 == k.1 && pad.0 == pad.1,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = if self.square {
            crate::ops::conv2d(x, &self.w, Some(&self.b), self.stride, self.pad.0)?
        } else {
            // 1x7, 7x1, 1x3, 3x1 kernels: pad each side by its own amount, then a valid conv
            let xp = x
                .pad_with_zeros(2, self.pad.0, self.pad.0)?
                .pad_with_zeros(3, self.pad.1, self.pad.1)?;
            let c = self.b.dims()[0];
            xp.conv2d(&self.w, 0, self.stride, 1, 1)?
                .broadcast_add(&self.b.reshape((1, c, 1, 1))?)?
        };
        Ok(y.relu()?)
    }
}

/// 3x3 average pooling, stride 1, padding 1, `count_include_pad = False`: each window's sum
/// divided by the number of real (unpadded) pixels in it.
fn avg_pool_3x3_exclude_pad(x: &Tensor) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    let xp = x.pad_with_zeros(2, 1, 1)?.pad_with_zeros(3, 1, 1)?;
    let sum = (xp.avg_pool2d_with_stride((3, 3), (1, 1))? * 9.0)?;
    let count = |i: usize, n: usize| (i + 1).min(n - 1) + 1 - i.saturating_sub(1);
    let mut inv = Vec::with_capacity(h * w);
    for i in 0..h {
        for j in 0..w {
            inv.push(1.0 / (count(i, h) * count(j, w)) as f32);
        }
    }
    let inv = Tensor::from_vec(inv, (1, 1, h, w), x.device())?;
    Ok(sum.broadcast_mul(&inv)?)
}

/// 3x3 max pooling, stride 1, padding 1 (padding by the edge values: the same maximum as
/// padding by -inf, since each edge value is inside its own window).
fn max_pool_3x3_same(x: &Tensor) -> Result<Tensor> {
    let xp = x.pad_with_same(2, 1, 1)?.pad_with_same(3, 1, 1)?;
    Ok(xp.max_pool2d_with_stride((3, 3), (1, 1))?)
}

/// FIDInceptionA (Mixed_5b/5c/5d).
struct InceptionA {
    b1x1: BasicConv,
    b5x5: [BasicConv; 2],
    b3x3dbl: [BasicConv; 3],
    pool: BasicConv,
}

impl InceptionA {
    fn load(src: &dyn WeightSource, name: &str, c_in: usize, pool_features: usize) -> Result<Self> {
        let l =
            |n: &str, ci, co, k, p| BasicConv::load(src, &format!("{name}.{n}"), ci, co, (k, k), 1, (p, p));
        Ok(InceptionA {
            b1x1: l("branch1x1", c_in, 64, 1, 0)?,
            b5x5: [l("branch5x5_1", c_in, 48, 1, 0)?, l("branch5x5_2", 48, 64, 5, 2)?],
            b3x3dbl: [
                l("branch3x3dbl_1", c_in, 64, 1, 0)?,
                l("branch3x3dbl_2", 64, 96, 3, 1)?,
                l("branch3x3dbl_3", 96, 96, 3, 1)?,
            ],
            pool: l("branch_pool", c_in, pool_features, 1, 0)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let a = self.b1x1.forward(x)?;
        let b = chain(&self.b5x5, x)?;
        let c = chain(&self.b3x3dbl, x)?;
        let d = self.pool.forward(&avg_pool_3x3_exclude_pad(x)?)?;
        Ok(Tensor::cat(&[a, b, c, d], 1)?)
    }
}

/// InceptionB (Mixed_6a): the grid reduction 35 -> 17.
struct InceptionB {
    b3x3: BasicConv,
    b3x3dbl: [BasicConv; 3],
}

impl InceptionB {
    fn load(src: &dyn WeightSource, name: &str, c_in: usize) -> Result<Self> {
        let l = |n: &str, ci, co, k, s, p| {
            BasicConv::load(src, &format!("{name}.{n}"), ci, co, (k, k), s, (p, p))
        };
        Ok(InceptionB {
            b3x3: l("branch3x3", c_in, 384, 3, 2, 0)?,
            b3x3dbl: [
                l("branch3x3dbl_1", c_in, 64, 1, 1, 0)?,
                l("branch3x3dbl_2", 64, 96, 3, 1, 1)?,
                l("branch3x3dbl_3", 96, 96, 3, 2, 0)?,
            ],
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let a = self.b3x3.forward(x)?;
        let b = chain(&self.b3x3dbl, x)?;
        let c = x.max_pool2d_with_stride((3, 3), (2, 2))?;
        Ok(Tensor::cat(&[a, b, c], 1)?)
    }
}

/// FIDInceptionC (Mixed_6b..6e): factorised 7x7 convolutions.
struct InceptionC {
    b1x1: BasicConv,
    b7x7: [BasicConv; 3],
    b7x7dbl: [BasicConv; 5],
    pool: BasicConv,
}

impl InceptionC {
    fn load(src: &dyn WeightSource, name: &str, c_in: usize, c7: usize) -> Result<Self> {
        let l = |n: &str, ci, co, k, p| BasicConv::load(src, &format!("{name}.{n}"), ci, co, k, 1, p);
        let (k1, k17, k71) = ((1, 1), (1, 7), (7, 1));
        let (p0, p17, p71) = ((0, 0), (0, 3), (3, 0));
        Ok(InceptionC {
            b1x1: l("branch1x1", c_in, 192, k1, p0)?,
            b7x7: [
                l("branch7x7_1", c_in, c7, k1, p0)?,
                l("branch7x7_2", c7, c7, k17, p17)?,
                l("branch7x7_3", c7, 192, k71, p71)?,
            ],
            b7x7dbl: [
                l("branch7x7dbl_1", c_in, c7, k1, p0)?,
                l("branch7x7dbl_2", c7, c7, k71, p71)?,
                l("branch7x7dbl_3", c7, c7, k17, p17)?,
                l("branch7x7dbl_4", c7, c7, k71, p71)?,
                l("branch7x7dbl_5", c7, 192, k17, p17)?,
            ],
            pool: l("branch_pool", c_in, 192, k1, p0)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let a = self.b1x1.forward(x)?;
        let b = chain(&self.b7x7, x)?;
        let c = chain(&self.b7x7dbl, x)?;
        let d = self.pool.forward(&avg_pool_3x3_exclude_pad(x)?)?;
        Ok(Tensor::cat(&[a, b, c, d], 1)?)
    }
}

/// InceptionD (Mixed_7a): the grid reduction 17 -> 8.
struct InceptionD {
    b3x3: [BasicConv; 2],
    b7x7x3: [BasicConv; 4],
}

impl InceptionD {
    fn load(src: &dyn WeightSource, name: &str, c_in: usize) -> Result<Self> {
        let l = |n: &str, ci, co, k, s, p| BasicConv::load(src, &format!("{name}.{n}"), ci, co, k, s, p);
        Ok(InceptionD {
            b3x3: [
                l("branch3x3_1", c_in, 192, (1, 1), 1, (0, 0))?,
                l("branch3x3_2", 192, 320, (3, 3), 2, (0, 0))?,
            ],
            b7x7x3: [
                l("branch7x7x3_1", c_in, 192, (1, 1), 1, (0, 0))?,
                l("branch7x7x3_2", 192, 192, (1, 7), 1, (0, 3))?,
                l("branch7x7x3_3", 192, 192, (7, 1), 1, (3, 0))?,
                l("branch7x7x3_4", 192, 192, (3, 3), 2, (0, 0))?,
            ],
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let a = chain(&self.b3x3, x)?;
        let b = chain(&self.b7x7x3, x)?;
        let c = x.max_pool2d_with_stride((3, 3), (2, 2))?;
        Ok(Tensor::cat(&[a, b, c], 1)?)
    }
}

/// FIDInceptionE_1 (Mixed_7b, average pooling without the padding) and FIDInceptionE_2
/// (Mixed_7c, max pooling).
struct InceptionE {
    b1x1: BasicConv,
    b3x3_1: BasicConv,
    b3x3_2: [BasicConv; 2],
    b3x3dbl_12: [BasicConv; 2],
    b3x3dbl_3: [BasicConv; 2],
    pool: BasicConv,
    max_pool: bool,
}

impl InceptionE {
    fn load(src: &dyn WeightSource, name: &str, c_in: usize, max_pool: bool) -> Result<Self> {
        let l = |n: &str, ci, co, k, p| BasicConv::load(src, &format!("{name}.{n}"), ci, co, k, 1, p);
        Ok(InceptionE {
            b1x1: l("branch1x1", c_in, 320, (1, 1), (0, 0))?,
            b3x3_1: l("branch3x3_1", c_in, 384, (1, 1), (0, 0))?,
            b3x3_2: [
                l("branch3x3_2a", 384, 384, (1, 3), (0, 1))?,
                l("branch3x3_2b", 384, 384, (3, 1), (1, 0))?,
            ],
            b3x3dbl_12: [
                l("branch3x3dbl_1", c_in, 448, (1, 1), (0, 0))?,
                l("branch3x3dbl_2", 448, 384, (3, 3), (1, 1))?,
            ],
            b3x3dbl_3: [
                l("branch3x3dbl_3a", 384, 384, (1, 3), (0, 1))?,
                l("branch3x3dbl_3b", 384, 384, (3, 1), (1, 0))?,
            ],
            pool: l("branch_pool", c_in, 192, (1, 1), (0, 0))?,
            max_pool,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let a = self.b1x1.forward(x)?;
        let h = self.b3x3_1.forward(x)?;
        let b = Tensor::cat(&[self.b3x3_2[0].forward(&h)?, self.b3x3_2[1].forward(&h)?], 1)?;
        let h = chain(&self.b3x3dbl_12, x)?;
        let c = Tensor::cat(
            &[self.b3x3dbl_3[0].forward(&h)?, self.b3x3dbl_3[1].forward(&h)?],
            1,
        )?;
        let pooled = if self.max_pool {
            max_pool_3x3_same(x)?
        } else {
            avg_pool_3x3_exclude_pad(x)?
        };
        let d = self.pool.forward(&pooled)?;
        Ok(Tensor::cat(&[a, b, c, d], 1)?)
    }
}

fn chain(layers: &[BasicConv], x: &Tensor) -> Result<Tensor> {
    let mut h = layers[0].forward(x)?;
    for l in &layers[1..] {
        h = l.forward(&h)?;
    }
    Ok(h)
}

/// pytorch-fid's InceptionV3 up to the block of the requested feature width.
pub struct FidInception {
    dims: usize,
    block0: [BasicConv; 3],
    block1: Option<[BasicConv; 2]>,
    block2: Option<([InceptionA; 3], InceptionB, [InceptionC; 4])>,
    block3: Option<(InceptionD, [InceptionE; 2])>,
}

impl FidInception {
    /// The network whose features are `dims` wide (64, 192, 768 or 2048), loading only the
    /// layers up to that block.
    pub fn load(src: &dyn WeightSource, dims: usize) -> Result<Self> {
        let block = block_of_dims(dims)?;
        let l = |n: &str, ci, co, k, s, p| BasicConv::load(src, n, ci, co, (k, k), s, (p, p));
        let block0 = [
            l("Conv2d_1a_3x3", 3, 32, 3, 2, 0)?,
            l("Conv2d_2a_3x3", 32, 32, 3, 1, 0)?,
            l("Conv2d_2b_3x3", 32, 64, 3, 1, 1)?,
        ];
        let block1 = if block >= 1 {
            Some([
                l("Conv2d_3b_1x1", 64, 80, 1, 1, 0)?,
                l("Conv2d_4a_3x3", 80, 192, 3, 1, 0)?,
            ])
        } else {
            None
        };
        let block2 = if block >= 2 {
            Some((
                [
                    InceptionA::load(src, "Mixed_5b", 192, 32)?,
                    InceptionA::load(src, "Mixed_5c", 256, 64)?,
                    InceptionA::load(src, "Mixed_5d", 288, 64)?,
                ],
                InceptionB::load(src, "Mixed_6a", 288)?,
                [
                    InceptionC::load(src, "Mixed_6b", 768, 128)?,
                    InceptionC::load(src, "Mixed_6c", 768, 160)?,
                    InceptionC::load(src, "Mixed_6d", 768, 160)?,
                    InceptionC::load(src, "Mixed_6e", 768, 192)?,
                ],
            ))
        } else {
            None
        };
        let block3 = if block >= 3 {
            Some((
                InceptionD::load(src, "Mixed_7a", 768)?,
                [
                    InceptionE::load(src, "Mixed_7b", 1280, false)?,
                    InceptionE::load(src, "Mixed_7c", 2048, true)?,
                ],
            ))
        } else {
            None
        };
        Ok(FidInception {
            dims,
            block0,
            block1,
            block2,
            block3,
        })
    }

    /// The feature width.
    pub fn dims(&self) -> usize {
        self.dims
    }

    /// Features `[N, dims]` of images `x` `[N, 3, H, W]` with values in [0, 1] (pytorch-fid's
    /// input: resized to 299 x 299 here, then scaled to [-1, 1]).
    pub fn features(&self, x: &Tensor) -> Result<Tensor> {
        let (_, c, _, _) = x.dims4()?;
        if c != 3 {
            return Err(Error::param(
                "images",
                format!("InceptionV3 reads 3-channel images, these have {c} channels"),
            ));
        }
        let x = x.to_dtype(DType::F32)?.upsample_bilinear2d(SIZE, SIZE, false)?;
        let x = ((x * 2.0)? - 1.0)?;
        let mut h = chain(&self.block0, &x)?.max_pool2d_with_stride((3, 3), (2, 2))?;
        if let Some(b1) = &self.block1 {
            h = chain(b1, &h)?.max_pool2d_with_stride((3, 3), (2, 2))?;
        }
        if let Some((a, b, c)) = &self.block2 {
            for m in a {
                h = m.forward(&h)?;
            }
            h = b.forward(&h)?;
            for m in c {
                h = m.forward(&h)?;
            }
        }
        if let Some((d, e)) = &self.block3 {
            h = d.forward(&h)?;
            for m in e {
                h = m.forward(&h)?;
            }
        }
        Ok(h.mean(D::Minus1)?.mean(D::Minus1)?)
    }
}
