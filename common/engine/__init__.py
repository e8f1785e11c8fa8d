"""What every engine uses and no lesson is about: devices, inputs and outputs, model sources and
weights, the detokenizer, memory and metrics, the command line of `python -m cycleN.run`."""
