"""fedpipe's round engine: rounds as stages of pushed messages and streamed replies.

`engine.RoundEngine` runs the rounds of a `CodecStrategy` on any Flower Grid;
`stage.run_stage` is one push-then-stream exchange; `sampling` picks a round's clients
reproducibly; `accumulate` holds the exact running sum (or, for strategies that need
them all, every update).
"""
