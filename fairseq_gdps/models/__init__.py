from fairseq_gdps.models import s2t_gdps  # noqa: F401  (registers s2t_transformer_gdps, s2t_conformer_gdps)
from fairseq_gdps.models import xm_transformer_gdps  # noqa: F401  (registers xm_transformer_gdps)
