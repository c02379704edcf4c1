"""``moe-bench quality``: dense vs Switch vs GShard vs BASE at equal compute per token.

Every arm is one ``moe-train experiment=quality <arm overrides>`` run: the same model shape,
tokens, schedule and seed; only the FFN changes.  Active FLOPs per token stay equal:

* top-1 arms (switch, base) use experts the size of the dense FFN (``moe.expert_d_ff=0``);
* the top-2 arm (gshard) uses experts of half the dense FFN's hidden size
  (``moe.expert_d_ff=d_ff/2``): two of them cost one dense FFN;
* ``deepseek-N`` splits each of N experts in 4 and routes 4 of them beside one shared expert,
  all five of ``d_ff/5`` (rounded down).

``<arm>@S`` arms begin from the dense model trained for S steps (the source run ``dense-S``,
trained first) and train the remaining steps: ``upcycle-N@S`` is upcycled from it
(``init_from``; halves of N copies of each dense FFN, two a token), ``dense@S`` continues dense
from the same checkpoint and is their baseline.  Their steps count from the source's step 0.

The runner starts ``--jobs`` arms at a time with ``cpu_count // jobs`` threads each, polls
their ``metrics.jsonl`` for one progress bar, and then writes the report (a markdown table
and PNG plots).  A finished arm is not launched again (its run dir's config must match the
arm's: other overrides are a one-line error before anything starts), and a part-trained one
resumes from its checkpoint, so a crashed comparison is re-run with the same command.

One room per job: ``arms`` (what each arm trains), ``run`` (planning, launching and watching
the arms: the command), ``progress`` (how far an arm is, from its files), ``curves`` (reading a
run's metrics into curves and the table's rows), ``final_eval`` (the final checkpoints on
shared val batches, paired with dense), ``report`` (the markdown and the bar), ``plots``
(matplotlib).  Reading and reporting are pure and tested without training.
"""
