DROP SERVICE [//AWDB/1DBSample/TargetService];
DROP QUEUE TargetQueue1DB;
DROP SERVICE [//AWDB/1DBSample/InitiatorService];
DROP QUEUE InitiatorQueue1DB;
DROP CONTRACT [//AWDB/1DBSample/SampleContract];
DROP MESSAGE TYPE [//AWDB/1DBSample/RequestMessage];
DROP MESSAGE TYPE [//AWDB/1DBSample/ReplyMessage];
GO
