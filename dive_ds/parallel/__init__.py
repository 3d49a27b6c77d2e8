"""DeepSpeed glue: process groups, expert parallelism, ZeRO. Model code never imports this."""
