"""The model's layers, below the public face: embeddings and their heads' building blocks
(`embeddings`), attention and feed-forward branches (`sublayers`), residual sites, layers and the
Encoder contract (`encoder`), the DEQ encoder (`deq`), the ODE-Transformer blocks (`blocks`), the
vector fields (`vector_fields`), row-split dropout (`dropout`), the ODE regularisers
(`regularizers`), zero/identity init marks (`init`) and the output dataclasses (`outputs`).

They import the numerics (`bertode.solve`) and `bertode.registry`, never the public face
(`bertode.modeling`, `bertode.configuration`, ...) nor the CLI (`bertode.training`). Users reach
them through `bertode` (`bertode.register_block`, `bertode.register_vector_field`, ...); this
package re-exports nothing, and importing it alone registers nothing.
"""
