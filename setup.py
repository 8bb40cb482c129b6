from setuptools import find_packages, setup

setup(
    name="fairseq-gdps",
    version="0.1.0",
    description="Gradient-Driven Parameter Sharing for low-resource multilingual speech translation (fairseq plugin)",
    packages=find_packages(include=["fairseq_gdps", "fairseq_gdps.*"]),
    python_requires=">=3.10",
    # Dependencies are installed by scripts/setup.sh with pins (torch must come first, CPU build).
    install_requires=[],
    # COMET scoring is optional: `pip install -e .[comet]` (needs a local model path at run time).
    extras_require={"comet": ["unbabel-comet"]},
    entry_points={
        "console_scripts": [
            "gdps-make-corpus=fairseq_gdps.cli.make_corpus:main",
            "gdps-prep=fairseq_gdps.cli.prep:main",
            "gdps-analyze=fairseq_gdps.cli.analyze:main",
            "gdps-train=fairseq_gdps.cli.train:cli_main",
            "gdps-score=fairseq_gdps.cli.score:main",
            "gdps-split-checkpoint=fairseq_gdps.cli.split_checkpoint:main",
            "gdps-prep-corpus=fairseq_gdps.cli.prep_corpus:main",
            "gdps-export=fairseq_gdps.cli.export:main",
            "gdps-prep-waveforms=fairseq_gdps.data.waveform_data:main",
        ]
    },
)
