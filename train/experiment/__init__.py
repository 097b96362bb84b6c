"""A run or a cross-validation from the command line's arguments to its result: config resolution, run folders,
training then evaluation. What train.run and train.cv share; imports every other room, and no command."""
