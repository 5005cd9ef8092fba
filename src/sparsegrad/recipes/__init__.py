"""sparsegrad.recipes: fine-tuning experiments built on the library (the `recipes` extra).

    config.py      RunConfig: one typed configuration, from which the command line is built
    finetune.py    FineTuneRecipe: the training loop, read top to bottom
    kinds/         task kinds behind one interface: classification, causal-LM chat
    tasks.py       the tasks; glue.py, chat.py their data; data.py load_task
    methods/       full FT, LoRA, MeProp, SparseGrad at equal trainable MLP parameters
    experiment.py  a command: validation, seeds, summary; search.py (Optuna), compare.py
    results.py     typed results: RunResult, SummaryRow
    cli.py         the `sparsegrad` command
Nothing here is imported by the library (`import sparsegrad`).
"""
