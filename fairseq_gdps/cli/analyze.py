"""gdps-analyze: per-language gradient statistics -> plan.json, report.md and plots. The command
lives in ``fairseq_gdps.gdps.analysis_command``, which the single-run switch
(``--gdps-split-at-update``) runs too, with the same flags."""
import sys

from fairseq_gdps.gdps.analysis_command import main

if __name__ == "__main__":
    sys.exit(main())
