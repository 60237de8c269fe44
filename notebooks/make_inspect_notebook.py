"""Regenerates notebooks/inspect_shards.ipynb (kept as a script so the notebook's source reviews as code)."""

from pathlib import Path

import nbformat as nbf

cells = [
    nbf.v4.new_markdown_cell(
        "# Inspect a run's shards\n\n"
        "Opens the shards a `textbook run` wrote (default `shards/quickstart`; set `TEXTBOOK_SHARDS` to another run "
        "directory) and looks at them from every side: counts, samples by source / topic / score band, decoded "
        "tokens next to the text, distributions, coverage, and the same data through `datasets`, pandas and DuckDB.\n\n"
        "Plots are drawn inline (`%matplotlib inline`), in Jupyter and in an executed copy alike."
    ),
    nbf.v4.new_code_cell(
        "%matplotlib inline\n"
        "import os\n"
        "from pathlib import Path\n\n"
        "import matplotlib.pyplot as plt\n"
        "import pandas as pd\n\n"
        "from pipeline.shards import open_shards\n\n"
        "root = Path.cwd() if (Path.cwd() / 'pipeline').is_dir() else Path.cwd().parent\n"
        "SHARDS = Path(os.environ.get('TEXTBOOK_SHARDS', root / 'shards' / 'quickstart'))\n"
        "shards = open_shards(SHARDS)\n"
        "shards"
    ),
    nbf.v4.new_markdown_cell("## Documents and tokens per split and source"),
    nbf.v4.new_code_cell(
        "rows = [{'split': split, 'source': src, **c}\n"
        "        for split, s in shards.stats()['splits'].items() for src, c in s['sources'].items()]\n"
        "counts = pd.DataFrame(rows)\n"
        "counts['tokens/doc'] = (counts['tokens'] / counts['documents']).round(1)\n"
        "counts"
    ),
    nbf.v4.new_code_cell(
        "by_source = counts.groupby('source')[['documents', 'tokens']].sum()\n"
        "fig, axes = plt.subplots(1, 2, figsize=(11, 3))\n"
        "by_source.documents.plot.barh(ax=axes[0], color='#2b6cb0', title='documents per source')\n"
        "by_source.tokens.plot.barh(ax=axes[1], color='#dd6b20', title='tokens per source')\n"
        "fig.tight_layout()\n"
        "plt.show()"
    ),
    nbf.v4.new_code_cell(
        "df = shards.to_pandas(columns=['id', 'text', 'input_ids', 'num_tokens', 'source', 'edu_score', 'topic', "
        "'audience', 'format', 'url'])\n"
        "assert len(df) == shards.manifest['totals']['documents']\n"
        "df[['split', 'source', 'num_tokens', 'edu_score', 'topic', 'audience', 'format']].head()"
    ),
    nbf.v4.new_markdown_cell("## Samples by source, topic and score band"),
    nbf.v4.new_code_cell(
        "def show(frame, n=2, chars=300):\n"
        "    for _, r in frame.head(n).iterrows():\n"
        "        print(f\"[{r.source}] topic={r.topic} audience={r.audience} edu={r.edu_score} id={r.id}\")\n"
        "        print(r.text[:chars].replace('\\n', ' '), '...\\n')\n\n"
        "for source, group in df.groupby('source'):\n"
        "    print('=' * 20, source, '=' * 20)\n"
        "    show(group.sample(min(2, len(group)), random_state=0))"
    ),
    nbf.v4.new_code_cell(
        "synthetic = df[df.topic.notna()]\n"
        "if len(synthetic):\n"
        "    subject = synthetic.topic.str.split('/').str[0].value_counts().index[0]\n"
        "    print('most common subject:', subject)\n"
        "    show(synthetic[synthetic.topic.str.startswith(subject)])\n"
        "scored = df[df.edu_score.notna()].copy()\n"
        "if len(scored):\n"
        "    scored['band'] = pd.cut(scored.edu_score, bins=[-1, 1, 2, 3, 4, 6], labels=['<1', '1-2', '2-3', '3-4', '4+'])\n"
        "    for band, group in scored.groupby('band', observed=True):\n"
        "        print('-' * 10, 'edu_score', band, f'({len(group)} docs)')\n"
        "        show(group, n=1, chars=200)"
    ),
    nbf.v4.new_markdown_cell("## Decoded tokens next to the text"),
    nbf.v4.new_code_cell(
        "row = df.iloc[0]\n"
        "decoded = shards.decode(row.input_ids)\n"
        "assert decoded == row.text, 'decode(input_ids) must give back the text'\n"
        "tok = shards.tokenizer\n"
        "pieces = [tok.decode([i]) for i in row.input_ids[:40]]\n"
        "pd.DataFrame({'id': row.input_ids[:40], 'token': pieces})"
    ),
    nbf.v4.new_markdown_cell("## Distributions"),
    nbf.v4.new_code_cell(
        "fig, axes = plt.subplots(1, 2, figsize=(11, 3.5))\n"
        "for source, group in df.groupby('source'):\n"
        "    axes[0].hist(group.num_tokens, bins=30, alpha=0.6, label=source)\n"
        "axes[0].set_xlabel('tokens per document')\n"
        "axes[0].legend()\n"
        "if df.edu_score.notna().any():\n"
        "    axes[1].hist(df.edu_score.dropna(), bins=20, color='#2b6cb0')\n"
        "axes[1].set_xlabel('edu_score')\n"
        "plt.show()"
    ),
    nbf.v4.new_code_cell(
        "if scored.empty:\n"
        "    print('no edu_score in these shards')\n"
        "else:\n"
        "    fig, ax = plt.subplots(figsize=(8, 3))\n"
        "    groups = [(source, g.edu_score) for source, g in scored.groupby('source')]\n"
        "    ax.boxplot([g for _, g in groups], vert=False)\n"
        "    ax.set_yticks(range(1, len(groups) + 1), [s for s, _ in groups])\n"
        "    ax.set_xlabel('edu_score')\n"
        "    ax.set_title('educational value by source')\n"
        "    plt.show()"
    ),
    nbf.v4.new_markdown_cell(
        "## Coverage of the synthetic documents\n\n"
        "How the kept synthetic textbooks spread over the taxonomy's subjects and the audiences (web-seeded ones "
        "count under `(web-seeded)`): an empty row or column is a gap in the data."
    ),
    nbf.v4.new_code_cell(
        "if len(synthetic):\n"
        "    subjects = synthetic.topic.str.split('/').str[0].replace({'web': '(web-seeded)'})\n"
        "    grid = pd.crosstab(subjects, synthetic.audience.fillna('(none)'))\n"
        "    fig, ax = plt.subplots(figsize=(max(6, 1.2 * grid.shape[1] + 3), 0.35 * len(grid) + 1.5))\n"
        "    im = ax.imshow(grid.values, cmap='Blues', aspect='auto')\n"
        "    ax.set_xticks(range(grid.shape[1]), grid.columns, rotation=30, ha='right')\n"
        "    ax.set_yticks(range(grid.shape[0]), grid.index)\n"
        "    for (i, j), v in pd.DataFrame(grid.values).stack().items():\n"
        "        ax.text(j, i, v, ha='center', va='center', fontsize=8, color='white' if v > grid.values.max() / 2 else 'black')\n"
        "    fig.colorbar(im, label='documents')\n"
        "    ax.set_title('topic × audience coverage')\n"
        "    plt.show()\n"
        "else:\n"
        "    print('no synthetic documents in these shards (the generate stage was skipped or kept nothing)')"
    ),
    nbf.v4.new_code_cell(
        "if len(synthetic) and synthetic.format.notna().any():\n"
        "    fmt = pd.crosstab(synthetic.format, synthetic.audience.fillna('(none)'))\n"
        "    fmt.plot.barh(stacked=True, figsize=(8, 0.4 * len(fmt) + 1.5), title='format × audience', colormap='tab20')\n"
        "    plt.xlabel('documents')\n"
        "    plt.show()"
    ),
    nbf.v4.new_markdown_cell("## The same shards through `datasets`, pandas and DuckDB"),
    nbf.v4.new_code_cell(
        "from pipeline.shards import load_hf\n\n"
        "# load_hf names the files and keys the datasets cache by the shards' content fingerprint, so it always returns\n"
        "# this folder's rows (datasets.load_dataset(str(SHARDS)) does too, through the fingerprint in the card's header)\n"
        "ds = load_hf(SHARDS)\n"
        "assert sum(ds[s].num_rows for s in ds) == len(df)\n"
        "ds"
    ),
    nbf.v4.new_code_cell(
        "pdf = pd.read_parquet(SHARDS / 'data', columns=['source', 'num_tokens'])\n"
        "pdf.groupby('source').num_tokens.agg(['count', 'sum'])"
    ),
    nbf.v4.new_code_cell(
        "import duckdb\n\n"
        "duckdb.sql(f\"select source, count(*) as docs, sum(num_tokens) as tokens, avg(edu_score) as mean_edu \"\n"
        "           f\"from '{SHARDS}/data/*.parquet' group by source order by tokens desc\").df()"
    ),
]

nb = nbf.v4.new_notebook(cells=cells, metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                                "language": "python"}})
out = Path(__file__).with_name("inspect_shards.ipynb")
nbf.write(nb, out)
print(f"wrote {out}")
