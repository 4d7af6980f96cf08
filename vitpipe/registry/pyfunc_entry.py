"""Models-from-code entry point of the registered pyfunc (MLflow copies this file into the model).

Logging the model as code instead of a cloudpickled object means loading a registered model
runs this import and nothing else: no unpickling of arbitrary objects, and the class is always
the installed ``vitpipe``'s own.
"""

import mlflow

from vitpipe.registry.pyfunc import VitClassifier

mlflow.models.set_model(VitClassifier())
