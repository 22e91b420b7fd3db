//! An SLM's float parameters as one flat vector, and back: what weight averaging (FedAvg,
//! the usual federated answer and one of our baselines) needs, whatever the architecture.

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::tensor::{Tensor, TensorData};

use crate::{Error, Result};

/// Collects every float parameter, in module order.
struct Collect {
    out: Vec<f32>,
    err: Option<String>,
}

impl ModuleVisitor for Collect {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        match param.val().into_data().convert::<f32>().try_to_vec::<f32>() {
            Ok(v) => self.out.extend(v),
            Err(e) => {
                self.err.get_or_insert(format!("{e:?}"));
            }
        }
    }
}

/// Replaces every float parameter from a flat slice, in module order.
struct Replace<'a> {
    src: &'a [f32],
    pos: usize,
    short: bool,
}

impl ModuleMapper for Replace<'_> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let shape = param.val().shape();
        let n = shape.num_elements();
        let Some(chunk) = self.src.get(self.pos..self.pos + n) else {
            self.short = true;
            return param;
        };
        self.pos += n;
        let chunk = chunk.to_vec();
        param.map(|t| {
            let device = t.device();
            Tensor::from_data(TensorData::new(chunk, shape), &device)
        })
    }
}

/// The module's float parameters, flattened in module order.
pub fn flatten<M: Module>(module: &M) -> Result<Vec<f32>> {
    let mut c = Collect {
        out: Vec::new(),
        err: None,
    };
    module.visit(&mut c);
    match c.err {
        Some(e) => Err(Error::Model(format!("reading parameters: {e}"))),
        None => Ok(c.out),
    }
}

/// `module` with its float parameters replaced by `weights` (from [`flatten`] of a module of
/// the same architecture and shape).
pub fn unflatten<M: Module>(module: M, weights: &[f32]) -> Result<M> {
    let mut r = Replace {
        src: weights,
        pos: 0,
        short: false,
    };
    let module = module.map(&mut r);
    if r.short || r.pos != weights.len() {
        return Err(Error::Model(format!(
            "weights do not fit the model: {} values given, the model {}",
            weights.len(),
            if r.short {
                "has more".to_string()
            } else {
                format!("has {}", r.pos)
            }
        )));
    }
    Ok(module)
}
