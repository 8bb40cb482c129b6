from setuptools import find_packages, setup

setup(
    name="fairseq-gdps",
    version="0.1.0",
    description="Gradient-Driven Parameter Sharing for low-resource multilingual speech translation (fairseq plugin)",
    packages=find_packages(include=["fairseq_gdps", "fairseq_gdps.*"]),
    python_requires=">=3.10",
    # Dependencies are installed by scripts/setup.sh with pins (torch must come first, CPU build).
    install_requires=[],
    entry_points={
        "console_scripts": [
            "gdps-make-corpus=fairseq_gdps.cli.make_corpus:main",
            "gdps-prep=fairseq_gdps.cli.prep:main",
            "gdps-analyze=fairseq_gdps.cli.analyze:main",
            "gdps-score=fairseq_gdps.cli.score:main",
            "gdps-split-checkpoint=fairseq_gdps.cli.split_checkpoint:main",
        ]
    },
)
