"""Train an HE-friendly MLP (polynomial activations) on scikit-learn data, in numpy only.

ReLU and tanh cannot be evaluated in CKKS without deep polynomial approximations; a network
trained with the activation it will run with (here x**2 or a degree-2 polynomial) needs one level
per activation and loses nothing in translation. torch is deliberately not required.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class PolyMLP:
    """A fitted MLP whose hidden activation is sum_k act_coeffs[k] * y**k.

    Attribute names follow scikit-learn's MLPClassifier (coefs_ are (in, out) matrices).
    """

    coefs_: list[np.ndarray]
    intercepts_: list[np.ndarray]
    act_coeffs: tuple[float, ...] = (0.0, 0.0, 1.0)
    classes_: np.ndarray = field(default_factory=lambda: np.arange(0))

    def decision_function(self, x: np.ndarray) -> np.ndarray:
        h = np.asarray(x, dtype=np.float64)
        for i, (w, b) in enumerate(zip(self.coefs_, self.intercepts_, strict=True)):
            h = h @ w + b
            if i < len(self.coefs_) - 1:
                h = sum(c * h**k for k, c in enumerate(self.act_coeffs))
        return h

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.classes_[np.argmax(self.decision_function(x), axis=1)]

    def score(self, x: np.ndarray, y: np.ndarray) -> float:
        return float(np.mean(self.predict(x) == y))


def train_poly_mlp(
    x: np.ndarray,
    y: np.ndarray,
    hidden: tuple[int, ...] = (32,),
    act_coeffs: tuple[float, ...] = (0.0, 0.0, 1.0),
    epochs: int = 60,
    batch_size: int = 64,
    lr: float = 3e-3,
    weight_decay: float = 1e-4,
    seed: int = 0,
) -> PolyMLP:
    """Fit a softmax classifier with polynomial hidden activations by mini-batch Adam.

    Small initial weights keep the squares from exploding early in training; the result is
    deterministic for a given seed.
    """
    rng = np.random.default_rng(seed)
    x = np.asarray(x, dtype=np.float64)
    classes, yi = np.unique(y, return_inverse=True)
    sizes = [x.shape[1], *hidden, len(classes)]
    ws = [rng.normal(0, 1.0 / np.sqrt(a), (a, b)) * 0.5 for a, b in zip(sizes, sizes[1:], strict=False)]
    bs = [np.zeros(b) for b in sizes[1:]]
    params = ws + bs
    m = [np.zeros_like(p) for p in params]
    v = [np.zeros_like(p) for p in params]
    onehot = np.eye(len(classes))[yi]
    coeffs = np.asarray(act_coeffs + (0.0,) * (3 - len(act_coeffs)))
    step = 0
    for _ in range(epochs):
        order = rng.permutation(len(x))
        for start in range(0, len(x), batch_size):
            idx = order[start : start + batch_size]
            hs, pre = [x[idx]], []
            for i in range(len(ws)):
                z = hs[-1] @ ws[i] + bs[i]
                pre.append(z)
                hs.append(coeffs[0] + coeffs[1] * z + coeffs[2] * z * z if i < len(ws) - 1 else z)
            logits = hs[-1] - hs[-1].max(axis=1, keepdims=True)
            p = np.exp(logits)
            p /= p.sum(axis=1, keepdims=True)
            grad = (p - onehot[idx]) / len(idx)
            gws, gbs = [None] * len(ws), [None] * len(ws)
            for i in reversed(range(len(ws))):
                if i < len(ws) - 1:
                    grad = grad * (coeffs[1] + 2 * coeffs[2] * pre[i])
                gws[i] = hs[i].T @ grad + weight_decay * ws[i]
                gbs[i] = grad.sum(axis=0)
                grad = grad @ ws[i].T
            step += 1
            for j, g in enumerate(gws + gbs):
                m[j] = 0.9 * m[j] + 0.1 * g
                v[j] = 0.999 * v[j] + 0.001 * g * g
                mh = m[j] / (1 - 0.9**step)
                vh = v[j] / (1 - 0.999**step)
                params[j] -= lr * mh / (np.sqrt(vh) + 1e-8)
    n = len(ws)
    return PolyMLP(
        coefs_=[p.copy() for p in params[:n]],
        intercepts_=[p.copy() for p in params[n:]],
        act_coeffs=tuple(float(c) for c in act_coeffs),
        classes_=classes,
    )


@dataclass
class PolyCNN:
    """A fitted CryptoNets-style CNN: Conv2d -> polynomial activation -> Flatten -> Dense.

    Kept in numpy so HE mode needs no torch; `to_onnx()` exports the standard ONNX graph
    (Conv, Mul, Flatten, Gemm) that `veil he compile` reads, so the compiled model goes through
    the same front end as a torch- or framework-exported one.
    """

    kernels: np.ndarray  # (C_out, C_in, k, k)
    conv_bias: np.ndarray  # (C_out,)
    dense: np.ndarray  # (C_out * Ho * Wo, classes), (in, out) as coefs_
    dense_bias: np.ndarray
    in_shape: tuple[int, int, int]  # (C_in, H, W)
    stride: int = 2
    padding: int = 1
    act_coeffs: tuple[float, ...] = (0.0, 0.0, 1.0)
    classes_: np.ndarray = field(default_factory=lambda: np.arange(0))

    def conv(self, x: np.ndarray) -> np.ndarray:
        """(n, C_in*H*W) -> (n, C_out*Ho*Wo) in ONNX's (C, H, W) flatten order."""
        cols, (ho, wo) = _im2col(x, self.in_shape, self.kernels.shape[2], self.stride, self.padding)
        k = self.kernels.reshape(len(self.kernels), -1)  # (C_out, C_in*k*k)
        out = cols @ k.T + self.conv_bias  # (n, Ho*Wo, C_out)
        return out.transpose(0, 2, 1).reshape(len(x), -1)

    def decision_function(self, x: np.ndarray) -> np.ndarray:
        z = self.conv(np.asarray(x, dtype=np.float64))
        h = sum(c * z**k for k, c in enumerate(self.act_coeffs))
        return h @ self.dense + self.dense_bias

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.classes_[np.argmax(self.decision_function(x), axis=1)]

    def score(self, x: np.ndarray, y: np.ndarray) -> float:
        return float(np.mean(self.predict(x) == y))

    def to_onnx(self) -> object:
        """The ONNX graph x(N, C, H, W) -> Conv -> act -> Flatten -> Gemm (opset 17)."""
        from onnx import TensorProto, helper, numpy_helper

        c_in, h, w = self.in_shape
        k = self.kernels.shape[2]
        p = self.padding
        inits = [
            numpy_helper.from_array(self.kernels.astype(np.float32), "K"),
            numpy_helper.from_array(self.conv_bias.astype(np.float32), "KB"),
            numpy_helper.from_array(self.dense.T.astype(np.float32), "W"),
            numpy_helper.from_array(self.dense_bias.astype(np.float32), "B"),
        ]
        nodes = [
            helper.make_node(
                "Conv",
                ["x", "K", "KB"],
                ["c"],
                kernel_shape=[k, k],
                strides=[self.stride] * 2,
                pads=[p, p, p, p],
                name="conv",
            ),
        ]
        c0, c1, c2 = (list(self.act_coeffs) + [0.0, 0.0, 0.0])[:3]
        nodes.append(helper.make_node("Mul", ["c", "c"], ["cc"], name="square"))
        act = "cc"
        if (c0, c1, c2) != (0.0, 0.0, 1.0):
            inits += [
                numpy_helper.from_array(np.array(v, np.float32), n) for v, n in ((c2, "a2"), (c1, "a1"), (c0, "a0"))
            ]
            nodes += [
                helper.make_node("Mul", ["cc", "a2"], ["t2"]),
                helper.make_node("Mul", ["c", "a1"], ["t1"]),
                helper.make_node("Add", ["t2", "t1"], ["t3"]),
                helper.make_node("Add", ["t3", "a0"], ["act"]),
            ]
            act = "act"
        nodes += [
            helper.make_node("Flatten", [act], ["f"], axis=1, name="flatten"),
            helper.make_node("Gemm", ["f", "W", "B"], ["y"], transB=1, name="dense"),
        ]
        graph = helper.make_graph(
            nodes,
            "poly_cnn",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, c_in, h, w])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, self.dense.shape[1]])],
            inits,
        )
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


def _im2col(x: np.ndarray, shape: tuple[int, int, int], k: int, stride: int, pad: int) -> tuple[np.ndarray, tuple]:
    """(n, C*H*W) -> windows (n, Ho*Wo, C*k*k), ordered (C, dy, dx) like a (C_out, C, k, k) kernel."""
    c, h, w = shape
    img = np.pad(x.reshape(-1, c, h, w), ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    ho, wo = (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1
    cols = np.empty((len(x), ho * wo, c * k * k))
    for yy in range(ho):
        for xx in range(wo):
            patch = img[:, :, yy * stride : yy * stride + k, xx * stride : xx * stride + k]
            cols[:, yy * wo + xx] = patch.reshape(len(x), -1)
    return cols, (ho, wo)


def train_poly_cnn(
    x: np.ndarray,
    y: np.ndarray,
    in_shape: tuple[int, int, int] = (1, 8, 8),
    channels: int = 4,
    kernel: int = 3,
    stride: int = 2,
    padding: int = 1,
    epochs: int = 60,
    batch_size: int = 64,
    lr: float = 3e-3,
    weight_decay: float = 1e-4,
    seed: int = 0,
) -> PolyCNN:
    """Fit Conv -> x**2 -> Dense with softmax by mini-batch Adam (numpy, deterministic per seed)."""
    rng = np.random.default_rng(seed)
    x = np.asarray(x, dtype=np.float64)
    classes, yi = np.unique(y, return_inverse=True)
    fan = in_shape[0] * kernel * kernel
    cols_all, (ho, wo) = _im2col(x, in_shape, kernel, stride, padding)
    hidden = channels * ho * wo
    params = [
        rng.normal(0, 1.0 / np.sqrt(fan), (channels, fan)) * 0.5,
        np.zeros(channels),
        rng.normal(0, 1.0 / np.sqrt(hidden), (hidden, len(classes))) * 0.5,
        np.zeros(len(classes)),
    ]
    m = [np.zeros_like(p) for p in params]
    v = [np.zeros_like(p) for p in params]
    onehot = np.eye(len(classes))[yi]
    step = 0
    for _ in range(epochs):
        order = rng.permutation(len(x))
        for start in range(0, len(x), batch_size):
            idx = order[start : start + batch_size]
            cols = cols_all[idx]  # (b, P, fan)
            kmat, kb, wd, bd = params
            z = cols @ kmat.T + kb  # (b, P, C)
            zf = z.transpose(0, 2, 1).reshape(len(idx), -1)
            hf = zf * zf
            logits = hf @ wd + bd
            logits -= logits.max(axis=1, keepdims=True)
            p = np.exp(logits)
            p /= p.sum(axis=1, keepdims=True)
            g = (p - onehot[idx]) / len(idx)
            g_wd = hf.T @ g + weight_decay * wd
            g_bd = g.sum(axis=0)
            g_z = ((g @ wd.T) * 2 * zf).reshape(len(idx), channels, -1).transpose(0, 2, 1)  # (b, P, C)
            g_k = np.einsum("bpc,bpf->cf", g_z, cols) + weight_decay * kmat
            g_kb = g_z.sum(axis=(0, 1))
            step += 1
            for j, gr in enumerate((g_k, g_kb, g_wd, g_bd)):
                m[j] = 0.9 * m[j] + 0.1 * gr
                v[j] = 0.999 * v[j] + 0.001 * gr * gr
                mh = m[j] / (1 - 0.9**step)
                vh = v[j] / (1 - 0.999**step)
                params[j] -= lr * mh / (np.sqrt(vh) + 1e-8)
    return PolyCNN(
        kernels=params[0].reshape(channels, in_shape[0], kernel, kernel).copy(),
        conv_bias=params[1].copy(),
        dense=params[2].copy(),
        dense_bias=params[3].copy(),
        in_shape=in_shape,
        stride=stride,
        padding=padding,
        classes_=classes,
    )
