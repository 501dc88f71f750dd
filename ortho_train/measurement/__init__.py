"""The measurement layer: the tables that measure a trained model (no Lightning).

    from ortho_train.measurement.kill_switch import KillSwitchTable, TableConfig
    rows = KillSwitchTable(model, pre_model, probe, TableConfig(), hessians_of, streams).run()

- `kill_switch` (+ `kill_switch_config`): the sieve's kill-switch table, every α of every sieve
  beside fp32 / INT-k / NF4 / pre-fine-tuning references;
- `privacy`: the run beside post-hoc noise, GPTQ (+ noise) and stochastic quantisation;
- `separation`: SVD split, pruning, η and LMC barriers of a fine-tune;
- `attacks`: what the tables add to a row where asked: offline RMIA against a reference model,
  extraction@k and the one-run ε audit;
- `relearning` (+ `relearning_config`): the relearning attack on an unlearned model, in fp and 4 bits;
- `progress` (each row's seconds, peak RSS and progress line) and `formatting` (markdown cells).

This package sits on top of the maths: it imports the sieve, privacy, separation, quantisation
and the private streams (`ortho_train.private_streams`), and nothing in `ortho_train` imports
it (tests/test_layering.py checks both). The callbacks (`ortho_callbacks`) import it.
"""
