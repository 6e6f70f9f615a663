//! The small inputs of a fused op (weights, biases, affine maps) packed end to end into one 1-D
//! tensor: candle's custom ops take at most three tensors, and `Tensor::cat` routes the packed
//! gradient back to each piece.
//!
//! The order of the pieces is written once, as the variant order of an enum declared with
//! [`pieces!`]. Packing the forward inputs ([`Builder`]) and assembling the backward gradient
//! ([`Layout::assemble`]) both walk that order, and every read goes through [`Layout::get`] by
//! name, so the forward pass, the backward pass and the gradient routing cannot disagree (a
//! swap in one place would otherwise pass the shape checks and train the wrong weights).

use std::marker::PhantomData;

use candle_core::{bail, Result, Tensor};

/// One named piece of a packed tensor; implemented by [`pieces!`].
pub(crate) trait Piece: Copy + std::fmt::Debug + 'static {
    /// Every piece, in packing order.
    const ALL: &'static [Self];
    /// Position in [`Piece::ALL`].
    fn index(self) -> usize;
}

/// Declares the pieces of a packed tensor, in packing order:
/// `pieces! { enum Part { Weight, Bias } }`.
macro_rules! pieces {
    ($(#[$meta:meta])* enum $name:ident { $($(#[$pmeta:meta])* $piece:ident),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        enum $name {
            $($(#[$pmeta])* $piece),+
        }

        impl $crate::ops::packed::Piece for $name {
            const ALL: &'static [Self] = &[$(Self::$piece),+];
            fn index(self) -> usize {
                self as usize
            }
        }
    };
}
pub(crate) use pieces;

/// Where each piece sits in a packed tensor (absent pieces have length 0).
#[derive(Clone, Debug)]
pub(crate) struct Layout<P: Piece> {
    ranges: Vec<(usize, usize)>,
    len: usize,
    _p: PhantomData<P>,
}

impl<P: Piece> Layout<P> {
    /// The layout of pieces of these lengths (indexed by [`Piece::index`]).
    fn from_lens(lens: &[usize]) -> Self {
        let mut at = 0;
        let ranges = lens
            .iter()
            .map(|&len| {
                let r = (at, len);
                at += len;
                r
            })
            .collect();
        Self {
            ranges,
            len: at,
            _p: PhantomData,
        }
    }

    /// Values in all.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Values of `piece` (0 when absent).
    pub(crate) fn len_of(&self, piece: P) -> usize {
        self.ranges[piece.index()].1
    }

    /// `piece`'s values in `packed`.
    pub(crate) fn get<'a>(&self, packed: &'a [f32], piece: P) -> &'a [f32] {
        let (at, len) = self.ranges[piece.index()];
        &packed[at..at + len]
    }

    /// The packed gradient from the gradient of each present piece. `what` names the op in
    /// the (internal) error for a missing or wrongly sized piece.
    pub(crate) fn assemble(&self, mut grads: Grads<P>, what: &str) -> Result<Vec<f32>> {
        let mut out = Vec::with_capacity(self.len);
        for &piece in P::ALL {
            let want = self.len_of(piece);
            let g = grads.parts[piece.index()].take().unwrap_or_default();
            if g.len() != want {
                bail!(
                    "{what}: internal error, the gradient of {piece:?} has {} values, expected {want}",
                    g.len()
                );
            }
            out.extend(g);
        }
        Ok(out)
    }
}

/// Collects the pieces of a packed tensor in any order; [`Builder::finish`] packs them in
/// [`Piece::ALL`] order.
pub(crate) struct Builder<P: Piece> {
    parts: Vec<Option<Tensor>>,
    _p: PhantomData<P>,
}

impl<P: Piece> Builder<P> {
    pub(crate) fn new() -> Self {
        Self {
            parts: vec![None; P::ALL.len()],
            _p: PhantomData,
        }
    }

    /// Sets `piece` to `t` (flattened).
    pub(crate) fn set(&mut self, piece: P, t: &Tensor) -> Result<()> {
        self.parts[piece.index()] = Some(t.flatten_all()?);
        Ok(())
    }

    /// The packed tensor and its layout.
    pub(crate) fn finish(self) -> Result<(Tensor, Layout<P>)> {
        let lens: Vec<usize> = self
            .parts
            .iter()
            .map(|p| p.as_ref().map_or(0, |t| t.elem_count()))
            .collect();
        let present: Vec<Tensor> = self.parts.into_iter().flatten().collect();
        if present.is_empty() {
            bail!("packed inputs: no piece is present");
        }
        Ok((Tensor::cat(&present, 0)?, Layout::from_lens(&lens)))
    }
}

/// The gradients of the pieces, set in any order (absent pieces stay unset).
pub(crate) struct Grads<P: Piece> {
    parts: Vec<Option<Vec<f32>>>,
    _p: PhantomData<P>,
}

impl<P: Piece> Grads<P> {
    pub(crate) fn new() -> Self {
        Self {
            parts: vec![None; P::ALL.len()],
            _p: PhantomData,
        }
    }

    /// Sets the gradient of `piece`.
    pub(crate) fn set(&mut self, piece: P, g: Vec<f32>) {
        self.parts[piece.index()] = Some(g);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    pieces! {
        enum Part { A, B, C }
    }

    fn t(v: &[f32]) -> Tensor {
        Tensor::new(v, &Device::Cpu).unwrap()
    }

    #[test]
    fn pieces_pack_in_declared_order_whatever_order_they_are_set_in() {
        let mut b = Builder::<Part>::new();
        b.set(Part::C, &t(&[5.0])).unwrap();
        b.set(Part::A, &t(&[1.0, 2.0])).unwrap();
        let (packed, layout) = b.finish().unwrap();
        let v: Vec<f32> = packed.to_vec1().unwrap();
        assert_eq!(v, [1.0, 2.0, 5.0]);
        assert_eq!(layout.get(&v, Part::A), [1.0, 2.0]);
        assert_eq!(layout.get(&v, Part::B), [] as [f32; 0]);
        assert_eq!(layout.get(&v, Part::C), [5.0]);
        assert_eq!((layout.len(), layout.len_of(Part::B)), (3, 0));
        // the gradient goes back in the same order
        let mut g = Grads::<Part>::new();
        g.set(Part::C, vec![-5.0]);
        g.set(Part::A, vec![-1.0, -2.0]);
        assert_eq!(layout.assemble(g, "test").unwrap(), [-1.0, -2.0, -5.0]);
    }

    #[test]
    fn a_missing_or_wrongly_sized_gradient_is_an_error() {
        let mut b = Builder::<Part>::new();
        b.set(Part::A, &t(&[1.0, 2.0])).unwrap();
        b.set(Part::B, &t(&[3.0])).unwrap();
        let (_, layout) = b.finish().unwrap();
        let mut g = Grads::<Part>::new();
        g.set(Part::A, vec![0.0, 0.0]);
        let e = layout.assemble(g, "op").unwrap_err().to_string();
        assert!(e.contains("the gradient of B has 0 values, expected 1"), "{e}");
        let mut g = Grads::<Part>::new();
        g.set(Part::A, vec![0.0]);
        g.set(Part::B, vec![0.0]);
        let e = layout.assemble(g, "op").unwrap_err().to_string();
        assert!(e.contains("the gradient of A has 1 values, expected 2"), "{e}");
    }
}
