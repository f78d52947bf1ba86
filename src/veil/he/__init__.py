"""HE mode: CKKS inference on ciphertexts the cloud cannot read.

Split as Concrete ML splits it: *dev* (`compile`, with `compiler`, `fusion`, `approx`, `bounds`,
`train` and `tasks`) turns a model into a `CompiledModel` (`compiled`) with parameters (`params`),
bounded and checked so that what it accepts runs; *client* (`client`,
`keys`) makes keys, encrypts and decrypts; *server* (`action`, `server`, `store`) loads compiled
models and evaluates them on ciphertexts. `backend` is the small interface the evaluator needs
from a CKKS library and `seal_backend` implements it on Microsoft SEAL 4.1 through
`tenseal.sealapi`.

The runtime imports only the server side (`veil.he.action` and what it imports), so that is all
the runtime's measurement covers; nothing on the server side may import a dev module (a test
checks the measured closure).
"""
