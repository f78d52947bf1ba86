"""HE mode: CKKS inference on ciphertexts the cloud cannot read.

Split as Concrete ML splits it: *dev* (`compiler`, `fusion`, `params`, `store`) turns a model into
a compiled plan with parameters; *client* (`client`, `keys`) makes keys, encrypts and decrypts;
*server* (`server`, `action`) evaluates the plan on ciphertexts. `backend` is the small interface
the evaluator needs from a CKKS library and `seal_backend` implements it on Microsoft SEAL 4.1
through `tenseal.sealapi`.
"""
