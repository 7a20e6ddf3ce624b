// placeholder: replaced by the client build-out
