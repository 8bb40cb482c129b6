"""The GDPS models. Importing this package registers them with fairseq; the names other packages
use are exported here, so that importers do not depend on the file layout."""
from fairseq_gdps.models import s2t_gdps  # noqa: F401  (registers s2t_transformer_gdps, s2t_conformer_gdps)
from fairseq_gdps.models import xm_transformer_gdps  # noqa: F401  (registers xm_transformer_gdps)
from fairseq_gdps.models.ffn_surgery import dense_state_dict, ffn_module_names, partitioned_ffns, split_ffns
from fairseq_gdps.models.language_embedding import LANG_EMBEDDING_FLAG, LANG_EMBEDDING_KEY
from fairseq_gdps.models.routing import GROUP_IDS_KEY
from fairseq_gdps.models.split_spec import parse_groups, resolve_split_spec

__all__ = [
    "GROUP_IDS_KEY",
    "LANG_EMBEDDING_FLAG",
    "LANG_EMBEDDING_KEY",
    "dense_state_dict",
    "ffn_module_names",
    "parse_groups",
    "partitioned_ffns",
    "resolve_split_spec",
    "split_ffns",
]
